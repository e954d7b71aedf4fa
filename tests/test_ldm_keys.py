"""The LDM <-> diffusers key mapping, checked against diffusers' own single-file converter."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from furlib.ldm_keys import diffusers_to_ldm, ldm_to_diffusers
from furlib.models import SD_VAE_CONFIG, TINY_CONFIG, load_vae

THREE_BLOCKS = dict(TINY_CONFIG, block_out_channels=(16, 32, 48), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)



def _vae(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].float(), b[k].float()), k


def _write(state: dict, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny VAE, its diffusers folder (the architecture) and its LDM single file."""
    root = tmp_path_factory.mktemp("tiny")
    vae = load_vae("tiny-random")
    vae.save_pretrained(root / "diffusers")
    return vae, root / "diffusers", _write(diffusers_to_ldm(vae.state_dict()), root / "tiny.safetensors")


@pytest.mark.parametrize("config", [TINY_CONFIG, THREE_BLOCKS], ids=["tiny", "3blocks"])
def test_round_trip_is_identity(config):
    state = _vae(config).state_dict()
    _assert_same(ldm_to_diffusers(diffusers_to_ldm(state), state), state)


def test_ldm_names_follow_the_original_layout(tiny):
    state = tiny[0].state_dict()
    ldm = diffusers_to_ldm(state)
    assert not [k for k in ldm if any(s in k for s in ("_blocks", "resnets", "attentions", "conv_norm_out"))]
    pairs = {  # LDM name: diffusers name (up blocks reversed: 4 blocks -> up.3 is up_blocks.0)
        "decoder.up.3.block.0.conv1.weight": "decoder.up_blocks.0.resnets.0.conv1.weight",
        "decoder.up.0.block.1.norm2.bias": "decoder.up_blocks.3.resnets.1.norm2.bias",
        "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "encoder.down.0.downsample.conv.bias": "encoder.down_blocks.0.downsamplers.0.conv.bias",
        "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.mid.block_2.conv2.weight": "decoder.mid_block.resnets.1.conv2.weight",
        "encoder.mid.attn_1.norm.weight": "encoder.mid_block.attentions.0.group_norm.weight",
        "decoder.mid.attn_1.proj_out.bias": "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.norm_out.weight": "decoder.conv_norm_out.weight",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    for ldm_name, diffusers_name in pairs.items():
        assert torch.equal(ldm[ldm_name], state[diffusers_name]), ldm_name
    q = state["decoder.mid_block.attentions.0.to_q.weight"]
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (*q.shape, 1, 1)  # linear -> 1x1 conv
    assert "decoder.up.0.upsample.conv.weight" not in ldm  # the last up block does not upsample
    assert "encoder.down.3.downsample.conv.weight" not in ldm


@pytest.mark.parametrize("config", [TINY_CONFIG, THREE_BLOCKS], ids=["tiny", "3blocks"])
def test_agrees_with_diffusers_converter(config):
    state = _vae(config, seed=1).state_dict()
    ldm = diffusers_to_ldm(state)
    _assert_same(convert_ldm_vae_checkpoint(ldm, dict(config)), state)
    _assert_same(ldm_to_diffusers(ldm, state), convert_ldm_vae_checkpoint(ldm, dict(config)))


def test_from_single_file_loads_our_file_offline(tiny):
    vae, folder, path = tiny
    loaded = AutoencoderKL.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert not any(v.is_meta for v in loaded.state_dict().values())  # diffusers loads non-strictly
    _assert_same(loaded.state_dict(), vae.state_dict())


def test_sd_architecture_matches_diffusers(tmp_path):
    """The SD VAE's 248 LDM keys and shapes, through diffusers' converter and from_single_file."""
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD_VAE_CONFIG))
    state = vae.state_dict()
    ldm = diffusers_to_ldm(state)
    assert len(ldm) == 248
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ldm["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    _assert_same(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), state)
    vae.save_pretrained(tmp_path / "diffusers")
    path = _write(ldm, tmp_path / "sd.safetensors")
    loaded = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "diffusers"), local_files_only=True)
    _assert_same(loaded.state_dict(), state)


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_prefixed_checkpoints_load(tiny, prefix):
    state = tiny[0].state_dict()
    full = {prefix + k: v for k, v in diffusers_to_ldm(state).items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # the rest of an SD file
    _assert_same(ldm_to_diffusers(full, state), state)


def test_ldm_training_loss_keys_are_ignored(tiny):
    state = tiny[0].state_dict()
    ldm = dict(diffusers_to_ldm(state), **{"loss.logvar": torch.zeros(()),
                                          "loss.discriminator.main.0.weight": torch.zeros(2)})
    _assert_same(ldm_to_diffusers(ldm, state), state)


def test_decoder_only_file_is_a_clear_error(tiny):
    state = tiny[0].state_dict()
    decoder_only = {k: v for k, v in diffusers_to_ldm(state).items() if k.startswith(("decoder.", "post_"))}
    with pytest.raises(ValueError, match="decoder-only") as err:
        ldm_to_diffusers(decoder_only, state)
    assert "missing" in str(err.value) and "encoder.conv_in.weight" in str(err.value)


def test_wrong_architecture_is_a_clear_error(tiny):
    state = tiny[0].state_dict()
    other = diffusers_to_ldm(_vae(THREE_BLOCKS).state_dict())
    with pytest.raises(ValueError) as err:
        ldm_to_diffusers(other, state)
    msg = str(err.value)
    assert "shape mismatches" in msg and "missing" in msg and "model expects" in msg


def test_unexpected_key_is_a_clear_error(tiny):
    state = tiny[0].state_dict()
    ldm = dict(diffusers_to_ldm(state), **{"decoder.up.9.block.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected 1 keys: decoder\.up\.9"):
        ldm_to_diffusers(ldm, state)


def test_unknown_diffusers_key_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="no LDM name"):
        diffusers_to_ldm(dict(tiny[0].state_dict(), **{"decoder.something.weight": torch.zeros(1)}))


def test_load_vae_reads_a_single_file(tiny):
    """A single file works as base_model of training/eval, with a diffusers folder as base_config."""
    vae, folder, path = tiny
    loaded = load_vae(str(path), base_config=str(folder))
    assert not loaded.training
    _assert_same(loaded.state_dict(), vae.state_dict())


def test_load_vae_upcasts_an_fp16_file(tiny, tmp_path):
    vae, folder, _ = tiny
    path = _write({k: v.half() for k, v in diffusers_to_ldm(vae.state_dict()).items()}, tmp_path / "h.safetensors")
    loaded = load_vae(str(path), base_config=str(folder))
    assert {v.dtype for v in loaded.state_dict().values()} == {torch.float32}
    _assert_same(loaded.state_dict(), {k: v.half() for k, v in vae.state_dict().items()})


def test_load_vae_wrong_file_is_a_value_error(tiny, tmp_path):
    _, folder, _ = tiny
    path = _write(diffusers_to_ldm(_vae(THREE_BLOCKS).state_dict()), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        load_vae(str(path), base_config=str(folder))


def test_pickled_checkpoint_is_refused(tiny, tmp_path):
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": diffusers_to_ldm(tiny[0].state_dict())}, path)
    with pytest.raises(ValueError, match="only .safetensors"):
        load_vae(str(path), base_config=str(tiny[1]))


def test_load_vae_says_which_keys_and_shapes_do_not_fit(tiny, tmp_path):
    """The mismatch's details reach the user, not only the converter's header line."""
    _, folder, _ = tiny
    path = _write(diffusers_to_ldm(_vae(THREE_BLOCKS).state_dict()), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit the architecture.*give base_config") as err:
        load_vae(str(path), base_config=str(folder))
    msg = str(err.value)
    assert "shape mismatches" in msg and "model expects" in msg and "missing" in msg
    assert "missing 28 keys: decoder.up.3.block.0.conv1.bias" in msg  # the LDM names, as in the file


def _old_attention_names(state: dict) -> dict:
    """Diffusers' files before 0.14 named the VAE's attention query/key/value/proj_attn."""
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    renamed = {}
    for k, v in state.items():
        for new, before in old.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{before}")
        renamed[k] = v
    return renamed


def test_a_diffusers_layout_file_loads_as_a_single_file(tiny, tmp_path):
    """A folder's diffusion_pytorch_model.safetensors given as a single file (diffusers'
    from_single_file takes it as it is): loaded, old attention names too; a wrong one is
    refused naming its diffusers keys."""
    vae, folder, _ = tiny
    _assert_same(load_vae(str(folder / "diffusion_pytorch_model.safetensors"), base_config=str(folder)).state_dict(),
                 vae.state_dict())
    old = _write(_old_attention_names(vae.state_dict()), tmp_path / "old.safetensors")
    _assert_same(load_vae(str(old), base_config=str(folder)).state_dict(), vae.state_dict())
    other = _write(_vae(THREE_BLOCKS).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit the architecture") as err:
        load_vae(str(other), base_config=str(folder))
    assert "missing" in str(err.value) and "decoder.up_blocks.3." in str(err.value)


def test_a_full_checkpoint_with_an_fp8_model_reads_only_its_vae(tiny, tmp_path):
    """ComfyUI's all-in-one FLUX.1 checkpoints hold an fp8 transformer beside the VAE: only the
    VAE's tensors are read (torch has no isfinite for fp8; the rest is gigabytes)."""
    vae, folder, _ = tiny
    full = {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    full["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"] = torch.ones(4, 4).to(torch.float8_e4m3fn)
    path = _write(full, tmp_path / "flux1-dev-fp8.safetensors")
    _assert_same(load_vae(str(path), base_config=str(folder)).state_dict(), vae.state_dict())
