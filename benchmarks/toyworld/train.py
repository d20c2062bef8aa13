"""Train the small latent diffusion model of the toy world and export it as a diffusers folder.

Two phases, each bounded by wall time so that the whole run fits about an hour on a 2-core CPU:
  1. AutoencoderKL (factor 4: 128² images -> 4×32×32 latents): MSE reconstruction + small KL.
     Its ``scaling_factor`` is then measured as 1 / std of the training latents.
  2. UNet2DConditionModel with SD 1.x block structure and layer names, scaled down, trained with the DDPM
     epsilon objective on the latents, conditioned only on the empty-prompt embedding of a tiny CLIP text encoder.
Checkpoints go to ``--work-dir`` every few minutes and the diffusers folder ``--out`` is re-exported at each
checkpoint, so an interrupted run still leaves a usable model. ``--resume`` continues from the work dir.

Example (CPU, about an hour):
    HF_HUB_OFFLINE=1 nohup python benchmarks/toyworld/train.py --vae-minutes 12 --unet-minutes 50 \
        > /tmp/toyworld_train.log 2>&1 &
On a GPU (`--device cuda`, the default where CUDA is available) both phases run under bf16 autocast on whole
images and whole latents with larger batches; see benchmarks/toyworld/RESULTS.md for the command that built the
shipped model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from emerdiff_pl.datasets import toyworld  # noqa: E402

DEFAULT_OUT = ROOT / "emerdiff_pl" / "assets" / "toyworld-ldm"
TRAIN_SEED = 12345  # scenes for training; evaluation uses other seeds (default 0)

# --- architecture -------------------------------------------------------------------------------------------
# 128² images, VAE factor 4 -> 32² latents; the U-Net's up_blocks.1 runs at latent/4 = 8², i.e. 16× coarser than
# the image (SD 1.x at 512²: 16², 32× coarser). Factor 2 (64² latents, 16² level, 8× coarser) would cost 4× the
# U-Net compute, which a 2-core CPU hour cannot afford; 16× makes boundary refinement matter even more.

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=128,
    mid_block_add_attention=False,  # fully convolutional: trained on crops, exact on whole images
)

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(16, 32, 64, 64),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,  # diffusers' legacy name: 2 heads per attention layer (SD 1.x uses 8)
)

TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=32,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    clip_sample=False,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- tokenizer / text encoder -------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A byte-level CLIP vocabulary with no merges: every byte is a token (512 + 2 special tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_text_side(tmp: Path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = write_tiny_tokenizer_files(tmp / "tok_src")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(config).eval()
    return tokenizer, text_encoder


@torch.no_grad()
def empty_prompt_embedding(tokenizer, text_encoder) -> torch.Tensor:
    ids = tokenizer(
        [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]  # 1×77×32


# --- data ---------------------------------------------------------------------------------------------------


def _scene_images(job: tuple[int, int, int]) -> np.ndarray:
    start, stop, size = job
    return np.stack([s.image for s in toyworld.generate_scenes(stop - start, TRAIN_SEED, size, start=start)])


def training_images(work: Path, num: int, size: int, workers: int = 1) -> np.ndarray:
    """uint8 N×H×W×3 training scenes (seed TRAIN_SEED), cached in the work dir."""
    path = work / f"train_images_{num}_{size}.npy"
    if path.exists():
        return np.load(path)
    if workers > 1:
        # scene i depends only on (TRAIN_SEED, i), so any split gives the same array
        from multiprocessing import get_context

        bounds = np.linspace(0, num, 4 * workers + 1).astype(int)
        jobs = [(int(a), int(b), size) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        with get_context("spawn").Pool(workers) as pool:
            images = np.concatenate(pool.map(_scene_images, jobs))
    else:
        from tqdm.auto import tqdm

        images = np.stack(
            [s.image for s in tqdm(toyworld.generate_scenes(num, TRAIN_SEED, size), total=num, desc="scenes")]
        )
    np.save(path, images)
    return images


def to_tensor(batch: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 N×H×W×3 (numpy, or a tensor already on the device) → float N×3×H×W in [-1, 1]."""
    batch = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
    return batch.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def image_source(images: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """Where training batches are cut from: the numpy array on CPU, one uint8 tensor on the GPU."""
    return torch.from_numpy(images).to(device) if device.type == "cuda" else images


def take(source, idx: np.ndarray, y0: int, x0: int, c: int) -> np.ndarray | torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source[torch.as_tensor(idx, device=source.device), y0 : y0 + c, x0 : x0 + c]
    return source[idx, y0 : y0 + c, x0 : x0 + c]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights), nothing on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_at(args, base: float, step: int, elapsed: float, budget: float) -> float:
    """Linear warm-up over 50 steps, then constant or (--lr-decay) cosine to 10% over the phase's time budget."""
    lr = base * min(1.0, (step + 1) / 50)
    if args.lr_decay:
        frac = min(1.0, elapsed / max(budget, 1e-9))
        lr *= 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
    return lr


def vae_config(args) -> dict:
    return dict(VAE_CONFIG, block_out_channels=tuple(args.vae_channels))


def unet_config(args) -> dict:
    return dict(UNET_CONFIG, block_out_channels=tuple(args.unet_channels))


# --- phases -------------------------------------------------------------------------------------------------


def train_vae(args, work: Path, images: np.ndarray):
    from diffusers import AutoencoderKL

    ckpt = work / "vae.pt"
    device = args.device
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args)).to(device)
    source = image_source(images, device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step, spent = 0, 0.0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["seconds"]
        if state.get("done") and spent >= args.vae_minutes * 60:
            log(f"VAE: resumed finished phase ({step} steps)")
            return vae.eval()
    rng = np.random.default_rng(args.seed + step)
    budget = args.vae_minutes * 60
    t0, last_ckpt, ema_loss = time.time() - spent, time.time(), None
    vae.train()
    while time.time() - t0 < budget:
        idx = rng.integers(0, len(images), size=args.vae_batch)
        c = args.vae_crop
        y0, x0 = (int(v) for v in rng.integers(0, args.size - c + 1, size=2))
        x = to_tensor(take(source, idx, y0, x0, c), device)
        if rng.random() < 0.5:
            x = x.flip(-1)
        for g in opt.param_groups:
            g["lr"] = lr_at(args, args.vae_lr, step, time.time() - t0, budget)
        with autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        mse = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = post.kl().float().mean() / (x.shape[-1] * x.shape[-2])
        loss = mse + 0.2 * l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_loss = mse.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * mse.item()
        if step % args.log_every == 0:
            psnr = 10 * math.log10(4.0 / max(ema_loss, 1e-8))
            log(
                f"VAE step {step} mse {ema_loss:.4f} (PSNR {psnr:.1f} dB) kl {kl.item():.3f} t {time.time() - t0:.0f}s"
            )
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            torch.save(
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "seconds": time.time() - t0,
                },
                ckpt,
            )
            last_ckpt = time.time()
    torch.save(
        {
            "model": vae.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "seconds": time.time() - t0,
            "done": True,
        },
        ckpt,
    )
    log(f"VAE done: {step} steps")
    return vae.eval()


@torch.no_grad()
def encode_latents(
    vae, images: np.ndarray, work: Path, batch: int = 32
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every training image, and the scaling factor 1 / std(latents)."""
    path = work / "latents.pt"
    if path.exists():
        d = torch.load(path)
        return d["mean"], d["std"], d["scale"]
    from tqdm.auto import tqdm

    means, stds = [], []
    device = next(vae.parameters()).device
    for i in tqdm(range(0, len(images), batch), desc="encode"):
        dist = vae.encode(to_tensor(images[i : i + batch], device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean + std * torch.randn_like(mean)
    scale = float(1.0 / sample.std())
    torch.save({"mean": mean, "std": std, "scale": scale}, path)
    log(f"latents {tuple(mean.shape)} std {sample.std():.3f} -> scaling_factor {scale:.4f}")
    return mean, std, scale


def train_unet(args, work: Path, latent_mean, latent_std, scale, cond, export_fn):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    ckpt = work / "unet.pt"
    device = args.device
    torch.manual_seed(args.seed)
    if args.init_from:  # fine-tune the exported (EMA) weights
        unet = UNet2DConditionModel.from_pretrained(args.init_from / "unet").to(device)
        args.unet_channels = tuple(unet.config.block_out_channels)
        log(f"U-Net initialised from {args.init_from}")
    else:
        unet = UNet2DConditionModel(**unet_config(args)).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    step, spent = 0, 0.0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["seconds"]
    log(f"U-Net params: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, starting at step {step}")
    alphas_cumprod = sched.alphas_cumprod.to(device)
    latent_mean, latent_std, cond = latent_mean.to(device), latent_std.to(device), cond.to(device)
    rng = torch.Generator().manual_seed(args.seed + step)
    budget = args.unet_minutes * 60
    t0, last_ckpt, ema_loss = time.time() - spent, time.time(), None
    unet.train()

    def save(final: bool = False) -> None:
        torch.save(
            {
                "model": unet.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "seconds": time.time() - t0,
            },
            ckpt,
        )
        export_fn(ema if step >= 500 else unet, step)
        log(f"checkpoint at step {step}{' (final)' if final else ''}")

    while time.time() - t0 < budget:
        # Most steps see random latent crops (a quarter of the attention tokens, far cheaper on a CPU), the rest
        # whole latents, so the 8×8 level and the full-length attention are trained too.
        side = latent_mean.shape[-1]
        crop = args.unet_crop if float(torch.rand((), generator=rng)) >= args.unet_full_fraction else side
        batch = args.unet_batch if crop < side else max(1, args.unet_batch // 4)
        idx = torch.randint(0, len(latent_mean), (batch,), generator=rng).to(device)
        oy, ox = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=rng))
        mean = latent_mean[idx, :, oy : oy + crop, ox : ox + crop]
        std = latent_std[idx, :, oy : oy + crop, ox : ox + crop]
        x0 = (mean + std * torch.randn(mean.shape, generator=rng).to(device)) * scale
        flip = (torch.rand(batch, generator=rng) < 0.5).to(device)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, 1000, (batch,), generator=rng).to(device)
        noise = torch.randn(x0.shape, generator=rng).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr = lr_at(args, args.unet_lr, step, time.time() - t0, budget)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast(device):
            pred = unet(xt, t, encoder_hidden_states=cond.expand(batch, -1, -1)).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % args.log_every == 0:
            log(f"U-Net step {step} loss {ema_loss:.4f} t {time.time() - t0:.0f}s")
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    save(final=True)
    return ema if step >= 500 else unet


# --- export -------------------------------------------------------------------------------------------------


def export(out: Path, vae, unet, tokenizer, text_encoder, scale: float, info: dict) -> None:
    """Write the diffusers folder (model_index.json + one save_pretrained folder per component)."""
    from diffusers import DDPMScheduler

    out.mkdir(parents=True, exist_ok=True)
    vae, unet = copy.deepcopy(vae).cpu(), copy.deepcopy(unet).cpu()
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    write_tiny_tokenizer_files(
        out / "tokenizer"
    )  # the slow-tokenizer files too, for any transformers version
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    import diffusers
    import transformers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = dict(info, transformers_version=transformers.__version__, torch_version=torch.__version__)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def train_decoder(args, work: Path, images: np.ndarray, vae, latent_mean, latent_std):
    """Fine-tune the VAE decoder on the frozen encoder's latents: the latent space (and so the U-Net trained on
    it) is unchanged, only the pictures decoded from it get sharper. Can run beside the U-Net phase."""
    ckpt = work / "vae_decoder.pt"
    device = args.device
    vae = vae.to(device)
    source = image_source(images, device)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    step, spent = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["seconds"]
    rng = np.random.default_rng(args.seed + 7 + step)
    budget = args.decoder_minutes * 60
    t0, last_ckpt, ema_loss = time.time() - spent, time.time(), None
    factor = args.size // latent_mean.shape[-1]
    c = args.vae_crop // factor  # latent crop side

    def save() -> None:
        torch.save(
            {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": time.time() - t0},
            ckpt,
        )

    vae.decoder.train()
    while time.time() - t0 < budget:
        idx = rng.integers(0, len(images), size=args.vae_batch)
        ly, lx = rng.integers(0, latent_mean.shape[-1] - c + 1, size=2)
        ly, lx = int(ly), int(lx)
        z = latent_mean[idx, :, ly : ly + c, lx : lx + c]
        z = (z + latent_std[idx, :, ly : ly + c, lx : lx + c] * torch.randn_like(z)).to(device)
        py, px = ly * factor, lx * factor
        x = to_tensor(take(source, idx, py, px, c * factor), device)
        for g in opt.param_groups:
            g["lr"] = lr_at(args, args.decoder_lr, step, time.time() - t0, budget)
        with autocast(device):
            rec = vae.decode(z).sample.float()
        mse = F.mse_loss(rec, x)
        loss = mse + 0.2 * (rec - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_loss = mse.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * mse.item()
        if step % args.log_every == 0:
            psnr = 10 * math.log10(4.0 / max(ema_loss, 1e-8))
            log(f"decoder step {step} mse {ema_loss:.4f} (PSNR {psnr:.1f} dB) t {time.time() - t0:.0f}s")
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    save()
    log(f"decoder fine-tuning done: {step} steps")
    return vae.eval()


def load_vae(args, work: Path):
    """The trained VAE, with the fine-tuned decoder when that phase has run."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config(args))
    path = work / "vae_decoder.pt" if (work / "vae_decoder.pt").exists() else work / "vae.pt"
    vae.load_state_dict(torch.load(path, map_location="cpu")["model"])
    return vae.to(args.device).eval()


@torch.no_grad()
def reconstruction_psnr(vae, images: np.ndarray) -> float:
    x = to_tensor(images[:64], next(vae.parameters()).device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return 10 * math.log10(4.0 / F.mse_loss(rec, x).item())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="diffusers folder to write")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "emerdiff_toyworld_train",
        help="checkpoints and caches (default: <tmp>/emerdiff_toyworld_train)",
    )
    p.add_argument("--num-train", type=int, default=4000, help=f"training scenes (seed {TRAIN_SEED})")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--vae-minutes", type=float, default=9.0)
    p.add_argument("--unet-minutes", type=float, default=45.0)
    p.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint + export interval")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=32, help="VAE training crop side in pixels")
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--unet-crop", type=int, default=16, help="latent crop side for most U-Net steps")
    p.add_argument("--unet-full-fraction", type=float, default=0.2, help="share of steps on whole latents")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU more threads are slower)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder-minutes", type=float, default=15.0, help="decoder fine-tuning after the U-Net")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument(
        "--phase",
        choices=("all", "decoder", "export"),
        default="all",
        help="all: VAE, U-Net, decoder fine-tuning, export. decoder: only fine-tune the decoder of a trained VAE "
        "(may run beside a U-Net run sharing --work-dir). export: write --out from the checkpoints in --work-dir",
    )
    p.add_argument("--resume", action="store_true", help="continue from checkpoints in --work-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1, help="processes generating the training scenes")
    p.add_argument(
        "--vae-channels", type=_ints, default=VAE_CONFIG["block_out_channels"], help="e.g. 16,32,64"
    )
    p.add_argument(
        "--unet-channels", type=_ints, default=UNET_CONFIG["block_out_channels"], help="e.g. 16,32,64,64"
    )
    p.add_argument(
        "--lr-decay", action="store_true", help="cosine learning-rate decay over each phase's budget"
    )
    p.add_argument("--log-every", type=int, default=25, help="log every N steps")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="an exported folder: keep its VAE, fine-tune its U-Net (skips the VAE phase)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    log(f"args: {vars(args)}")
    images = training_images(work, args.num_train, args.size, args.workers)
    log(f"{len(images)} training scenes")
    tokenizer, text_encoder = build_text_side(work)
    cond = empty_prompt_embedding(tokenizer, text_encoder)

    if args.phase == "decoder":
        vae = load_vae(args, work)
        mean, std, _ = encode_latents(vae, images, work)
        train_decoder(args, work, images, vae, mean, std)
        log(f"VAE reconstruction PSNR on 64 training scenes: {reconstruction_psnr(vae, images):.2f} dB")
        return 0
    if args.phase == "export":
        from diffusers import UNet2DConditionModel

        vae = load_vae(args, work)
        mean, std, scale = encode_latents(vae, images, work)
        state = torch.load(work / "unet.pt", map_location="cpu")
        unet = UNet2DConditionModel(**unet_config(args))
        unet.load_state_dict(state["ema"] if state["step"] >= 500 else state["model"])
        psnr = reconstruction_psnr(vae, images)
        log(f"VAE reconstruction PSNR on 64 training scenes: {psnr:.2f} dB")
    else:
        if args.init_from:  # continue from an exported model: its VAE (and latent scale) stay as they are
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(args.init_from / "vae").to(args.device).eval()
            args.vae_channels = tuple(vae.config.block_out_channels)
        else:
            vae = train_vae(args, work, images)
        psnr = reconstruction_psnr(vae, images)
        log(f"VAE reconstruction PSNR on 64 training scenes: {psnr:.2f} dB")
        mean, std, scale = encode_latents(vae, images, work)
        if args.init_from:
            scale = float(vae.config.scaling_factor)

    def export_fn(unet, step):
        info = {
            "train_seed": TRAIN_SEED,
            "num_train_scenes": len(images),
            "image_size": args.size,
            "vae_recon_psnr_db": round(psnr, 2),
            "unet_steps": step,
            "unet_batch": args.unet_batch,
            "scaling_factor": scale,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        export(args.out, vae, unet, tokenizer, text_encoder, scale, info)

    if args.phase == "export":
        export_fn(unet, state["step"])
    else:
        unet = train_unet(args, work, mean, std, scale, cond, export_fn)
        if args.decoder_minutes > 0:
            vae = train_decoder(args, work, images, vae, mean, std)
            psnr = reconstruction_psnr(vae, images)
            log(f"VAE reconstruction PSNR after decoder fine-tuning: {psnr:.2f} dB")
            export_fn(unet, torch.load(work / "unet.pt", map_location="cpu")["step"])
    log(f"exported to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
