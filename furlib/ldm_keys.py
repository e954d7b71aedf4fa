"""Renaming a full ``AutoencoderKL`` state dict between diffusers and the original LDM layout.

The LDM layout is what A1111 and ComfyUI read from a standalone VAE ``.safetensors`` (bare keys,
encoder included). The differences, all handled by one table of name templates:
- down/up blocks are ``down.{i}`` / ``up.{k}``; LDM numbers the decoder's up blocks in reverse
  (diffusers ``decoder.up_blocks.i`` is LDM ``decoder.up.{n-1-i}``);
- resnets are ``block.{j}``, their shortcut is ``nin_shortcut`` (diffusers ``conv_shortcut``);
- the mid block is ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``;
- the mid attention's q/k/v/proj_out are 1x1 convs in LDM, shape (out, in, 1, 1), and linear
  layers in diffusers, shape (out, in);
- ``norm_out`` is diffusers' ``conv_norm_out``; conv_in, conv_out, (post_)quant_conv are shared.
Any number of blocks and resnets per block works. Tensors are renamed and reshaped, never copied
into another dtype: an fp16 file stays fp16 until it is loaded into a model.

A file already in diffusers' layout (a folder's ``diffusion_pytorch_model.safetensors`` given as a
single file, which diffusers' ``from_single_file`` also takes) is read as it is, with the attention
names of diffusers' files before 0.14 (``query``, ``key``, ``value``, ``proj_attn``) renamed.
"""

import functools
import re

PREFIXES = ("first_stage_model.", "vae.")  # a full SD checkpoint nests its VAE under one of these
IGNORED_PREFIXES = ("loss.",)  # LDM training checkpoints keep LPIPS/critic weights here: not the VAE

_RES = "(?P<res>norm1|conv1|norm2|conv2)"
_FIELDS = {"side": "(?P<side>encoder|decoder)", "leaf": "(?P<leaf>weight|bias)",
           "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "u": r"(?P<u>\d+)", "ru": r"(?P<ru>\d+)",
           "res": _RES}
# (diffusers template, LDM template, stored as a 1x1 conv in LDM). {u} is a diffusers up block
# index and {ru} the same block's LDM index, n_up - 1 - u.
_PAIRS = [
    ("{side}.conv_in.{leaf}", "{side}.conv_in.{leaf}", False),
    ("{side}.conv_out.{leaf}", "{side}.conv_out.{leaf}", False),
    ("{side}.conv_norm_out.{leaf}", "{side}.norm_out.{leaf}", False),
    ("quant_conv.{leaf}", "quant_conv.{leaf}", False),
    ("post_quant_conv.{leaf}", "post_quant_conv.{leaf}", False),
    ("encoder.down_blocks.{i}.resnets.{j}.{res}.{leaf}", "encoder.down.{i}.block.{j}.{res}.{leaf}", False),
    ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{leaf}",
     "encoder.down.{i}.block.{j}.nin_shortcut.{leaf}", False),
    ("encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}", "encoder.down.{i}.downsample.conv.{leaf}", False),
    ("decoder.up_blocks.{u}.resnets.{j}.{res}.{leaf}", "decoder.up.{ru}.block.{j}.{res}.{leaf}", False),
    ("decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.{leaf}",
     "decoder.up.{ru}.block.{j}.nin_shortcut.{leaf}", False),
    ("decoder.up_blocks.{u}.upsamplers.0.conv.{leaf}", "decoder.up.{ru}.upsample.conv.{leaf}", False),
    ("{side}.mid_block.resnets.0.{res}.{leaf}", "{side}.mid.block_1.{res}.{leaf}", False),
    ("{side}.mid_block.resnets.0.conv_shortcut.{leaf}", "{side}.mid.block_1.nin_shortcut.{leaf}", False),
    ("{side}.mid_block.resnets.1.{res}.{leaf}", "{side}.mid.block_2.{res}.{leaf}", False),
    ("{side}.mid_block.resnets.1.conv_shortcut.{leaf}", "{side}.mid.block_2.nin_shortcut.{leaf}", False),
    ("{side}.mid_block.attentions.0.group_norm.{leaf}", "{side}.mid.attn_1.norm.{leaf}", False),
    ("{side}.mid_block.attentions.0.to_q.{leaf}", "{side}.mid.attn_1.q.{leaf}", True),
    ("{side}.mid_block.attentions.0.to_k.{leaf}", "{side}.mid.attn_1.k.{leaf}", True),
    ("{side}.mid_block.attentions.0.to_v.{leaf}", "{side}.mid.attn_1.v.{leaf}", True),
    ("{side}.mid_block.attentions.0.to_out.0.{leaf}", "{side}.mid.attn_1.proj_out.{leaf}", True),
]


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


@functools.cache
def _rules() -> list:
    return [(_compile(d), d, _compile(ldm), ldm, conv) for d, ldm, conv in _PAIRS]


def _rename(name: str, n_up: int, to_ldm: bool) -> tuple[str, bool] | None:
    """The other layout's name of ``name`` and whether it is an attention 1x1-conv weight."""
    for d_re, d_tpl, l_re, l_tpl, conv in _rules():
        match = (d_re if to_ldm else l_re).match(name)
        if match is None:
            continue
        fields = match.groupdict()
        if fields.get("u") is not None:
            fields["ru"] = str(n_up - 1 - int(fields["u"]))
        elif fields.get("ru") is not None:
            fields["u"] = str(n_up - 1 - int(fields["ru"]))
        if int(fields.get("u", 0)) < 0 or int(fields.get("ru", 0)) < 0:
            return None  # an up block the architecture does not have
        return (l_tpl if to_ldm else d_tpl).format(**fields), conv and fields["leaf"] == "weight"
    return None


def _count_up_blocks(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def diffusers_to_ldm(state: dict) -> dict:
    """An ``AutoencoderKL.state_dict()`` renamed to bare LDM keys (attention weights as 1x1 convs)."""
    n_up = _count_up_blocks(state, r"decoder\.up_blocks\.(\d+)\.")
    out, unknown = {}, []
    for name, tensor in state.items():
        renamed = _rename(name, n_up, to_ldm=True)
        if renamed is None:
            unknown.append(name)
            continue
        ldm_name, conv = renamed
        out[ldm_name] = tensor.reshape(*tensor.shape, 1, 1) if conv and tensor.ndim == 2 else tensor
    if unknown:
        raise ValueError(f"{len(unknown)} diffusers keys have no LDM name (not an AutoencoderKL "
                         f"state dict?): {_head(unknown)}")
    return out


def strip_prefix(ldm_state: dict) -> dict:
    """Bare VAE keys: drop a ``first_stage_model.``/``vae.`` prefix and the keys outside it."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in ldm_state):
            return {k[len(prefix):]: v for k, v in ldm_state.items() if k.startswith(prefix)}
    return {k: v for k, v in ldm_state.items() if not k.startswith(IGNORED_PREFIXES)}


_OLD_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_diffusers_layout(keys) -> bool:
    """Whether a file's (bare) keys are diffusers' names: LDM has no up_blocks, down_blocks, mid_block."""
    return any(".up_blocks." in k or ".down_blocks." in k or ".mid_block." in k for k in keys)


def _diffusers_name(name: str) -> tuple[str, bool]:
    return _OLD_ATTENTION.sub(lambda m: f"{m[1]}{_NEW_ATTENTION[m[2]]}.", name), False


def ldm_to_diffusers(ldm_state: dict, reference_state: dict) -> dict:
    """LDM-layout tensors renamed for a model whose ``state_dict()`` is ``reference_state``.

    The reference gives the architecture (number of up blocks) and the expected shapes; anything
    that does not fit raises one ``ValueError`` listing missing keys, unexpected keys and shape
    mismatches, so a wrong file never reaches ``load_state_dict``. Tensors already in diffusers'
    layout are checked the same way, under their own names.
    """
    n_up = _count_up_blocks(reference_state, r"decoder\.up_blocks\.(\d+)\.")
    state = strip_prefix(ldm_state)
    diffusers = is_diffusers_layout(state)
    out, seen, unexpected, mismatched = {}, set(), [], []
    for name, tensor in state.items():
        renamed = _diffusers_name(name) if diffusers else _rename(name, n_up, to_ldm=False)
        if renamed is None or renamed[0] not in reference_state:
            unexpected.append(name)
            continue
        key, conv = renamed
        seen.add(key)
        want, have = tuple(reference_state[key].shape), tuple(tensor.shape)
        if conv and tensor.ndim == 4 and have[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # 1x1 conv -> linear: same numbers, no copy
        if tuple(tensor.shape) != want:
            want_ldm = (*want, 1, 1) if conv else want
            mismatched.append(f"{name} {have} (model expects {want_ldm})")
            continue
        out[key] = tensor
    missing = [k for k in reference_state if k not in seen]
    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_message(missing, unexpected, mismatched, 0 if diffusers else n_up))
    return out


def diffusers_to_ldm_name(name: str, n_up: int) -> str | None:
    renamed = _rename(name, n_up, to_ldm=True)
    return renamed[0] if renamed else None


def _mismatch_message(missing, unexpected, mismatched, n_up) -> str:
    """One message for every misfit; missing keys by their LDM names (by diffusers' when n_up is 0)."""
    lines = ["this file does not fit the VAE architecture (base_config):"]
    if missing:
        shown = [diffusers_to_ldm_name(k, n_up) or k for k in missing] if n_up else missing
        lines.append(f"  missing {len(missing)} keys: {_head(shown)}")
        if all(k.startswith(("encoder.", "quant_conv.")) for k in missing):
            lines.append("  (no encoder: a decoder-only file; A1111 refuses these, ship the whole VAE)")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} keys: {_head(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatches: {_head(mismatched)}")
    return "\n".join(lines)


def _head(items: list, n: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
