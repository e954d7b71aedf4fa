"""The one error an unusable input raises, so that a data report can count it by reason."""


class ImageRejected(Exception):
    """An input that is not usable as an image; ``reason`` is a short snake_case code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
