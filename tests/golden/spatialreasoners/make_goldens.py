"""Generate golden reference data from the SRM authors' `spatialreasoners` (PyPI 1.0.5).

Imports the installed package and runs its code unmodified; only data is written here.
The package's top-level ``__init__`` (which pulls in wandb/diffusers/lightning trainer code) is
skipped by registering an empty package object, and a few unneeded third-party imports
(diffusers, timm, rotary_embedding_torch, colorama, ... used only by other denoisers/autoencoders)
are replaced by empty stub modules. None of them is used by the code exercised here.

Run (CPU, float32):
  OMP_NUM_THREADS=1 nice -n 19 /work/sr_venv/bin/python tests/golden/spatialreasoners/make_goldens.py
"""

import dataclasses
import importlib.util
import json
import os
import sys
import types

# ---- import plumbing (no source is modified) -------------------------------------------------
STUBBED = []


class _DummyMeta(type):

  def __getattr__(cls, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return cls

  def __getitem__(cls, item):
    return cls


class _Dummy(metaclass=_DummyMeta):

  def __init__(self, *a, **k):
    pass


def _stub(name):
  m = types.ModuleType(name)
  m.__path__ = []

  def _ga(attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Dummy

  m.__getattr__ = _ga
  sys.modules[name] = m
  STUBBED.append(name)
  return m


class _Finder:
  ROOTS = (
      "diffusers",
      "wandb",
      "torchvision",
      "timm",
      "av",
      "roma",
      "rotary_embedding_torch",
      "gdown",
      "colorspacious",
      "seaborn",
      "matplotlib",
      "tensorboard",
      "accelerate",
      "scipy",
      "pandas",
      "PIL",
      "colorama",
  )

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in self.ROOTS:
      return importlib.util.spec_from_loader(name, self)

  def create_module(self, spec):
    return _stub(spec.name)

  def exec_module(self, m):
    pass


sys.meta_path.append(_Finder())
_spec = importlib.util.find_spec("spatialreasoners")
_pkg = types.ModuleType("spatialreasoners")
_pkg.__path__ = list(_spec.submodule_search_locations)
sys.modules["spatialreasoners"] = _pkg

import numpy as np
import torch
from importlib.metadata import version as _ver

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

from spatialreasoners.denoising_model.denoiser.dit.model import DiT, DiTCfg
from spatialreasoners.denoising_model.denoiser.dit.modules import DiTBlockCfg, OutputLayerCfg
from spatialreasoners.denoising_model.denoiser.dit.type_extensions import DiTModelInputs
from spatialreasoners.denoising_model.denoiser.modules.attention import AttentionCfg
from spatialreasoners.denoising_model.denoiser.modules.feed_forward import LightningDiTSwiGLUCfg
from spatialreasoners.denoising_model.denoiser.modules.norm_1d import RMSNormCfg
from spatialreasoners.denoising_model.denoiser.modules.pos_embedding import RotaryPosEmbeddingCfg
from spatialreasoners.denoising_model.denoiser.embedding import EmbeddingSinusodialCfg
from spatialreasoners.denoising_model.tokenizer.dit_tokenizer.image_dit_tokenizer import ImageDiTTokenizer
from spatialreasoners.denoising_model import flow as F
from spatialreasoners.denoising_model.flow.beta_schedule import CosineCfg, CosineSimpleDiffusionCfg, LinearCfg

OUT = os.path.dirname(os.path.abspath(__file__))
VERS = {
    "spatialreasoners": _ver("spatialreasoners"),
    "torch": torch.__version__,
    "numpy": np.__version__,
}


def save(name, arrays, cfg):
  cfg = dict(cfg, versions=VERS, stubbed_modules=sorted(set(STUBBED)))
  arrays = {
      k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v))
      for k, v in arrays.items()
  }
  arrays = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in arrays.items()}
  arrays["config_json"] = np.array(json.dumps(cfg, indent=1, default=str))
  np.savez_compressed(os.path.join(OUT, name), **arrays)
  print(name, os.path.getsize(os.path.join(OUT, name)), "bytes", len(arrays), "arrays")


class StubTokenizer:
  """Stands in for ImageDiTTokenizer: DiT only reads these three attributes."""

  def __init__(self, d_in, d_out, grid):
    self.model_d_in, self.model_d_out, self.token_grid_size = d_in, d_out, list(grid)


def dit_cfg(form, d_hid, depth, heads, d_emb=256, mlp_ratio=None):
  if (
      form == "dit"
  ):  # original DiT: LayerNorm(no affine, eps 1e-6), GELU(tanh?) MLP, abs. sin-cos pos emb
    block = DiTBlockCfg(
        attention=AttentionCfg(num_heads=heads), mlp_ratio=4.0 if mlp_ratio is None else mlp_ratio
    )
    return DiTCfg(
        time_embedding=EmbeddingSinusodialCfg(d_emb=d_emb), block=block, d_hid=d_hid, depth=depth
    )
  # LightningDiT form: RMSNorm everywhere (affine), qk RMSNorm, SwiGLU FFN, 2D RoPE in attention
  block = DiTBlockCfg(
      attention=AttentionCfg(num_heads=heads, qk_norm=RMSNormCfg(eps=1e-6)),
      feed_forward=LightningDiTSwiGLUCfg(),
      norm_layer=RMSNormCfg(eps=1e-6),
      mlp_ratio=(8 / 3) if mlp_ratio is None else mlp_ratio,
  )
  return DiTCfg(
      time_embedding=EmbeddingSinusodialCfg(d_emb=d_emb),
      block=block,
      d_hid=d_hid,
      depth=depth,
      rel_pos_embedding=RotaryPosEmbeddingCfg(),
      out_layer=OutputLayerCfg(norm=RMSNormCfg(eps=1e-6)),
  )


def asdict(c):
  return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c


def make_dit(form, fname, seed):
  H = W = 16
  C = 1
  P = 2
  g = H // P
  N = g * g
  d_in = C * P * P
  d_out = d_in + 1  # + 1 = per-token log-variance ("predict_uncertainty")
  cfg = dit_cfg(form, 64, 2, 2, d_emb=64, mlp_ratio=2.0)
  torch.manual_seed(seed)
  m = DiT(cfg, StubTokenizer(d_in, d_out, (g, g))).eval()
  gen = torch.Generator().manual_seed(seed + 100)
  redrawn, perturbed = [], []
  with torch.no_grad():
    for name, p in m.named_parameters():
      if (
          torch.count_nonzero(p) == 0
          and p.ndim >= 1
          and ("adaLN" in name or "out_layer.linear" in name or name.endswith("bias"))
      ):
        p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        redrawn.append(name)
    for mn, mod in m.named_modules():
      if (
          isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm))
          and getattr(mod, "weight", None) is not None
      ):
        mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
        perturbed.append(mn + ".weight")
        if getattr(mod, "bias", None) is not None:
          mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
          perturbed.append(mn + ".bias")
  B = 2
  x_img = torch.randn(B, C, H, W, generator=gen)
  # tokens: row-major over the 8x8 patch grid, feature = (c, py, px) flattened (c slowest)
  z_tok = x_img.reshape(B, C, g, P, g, P).permute(0, 2, 4, 1, 3, 5).reshape(B, N, C * P * P)
  t = torch.rand(B, N, generator=gen)
  t[0, :16] = 0.0
  t[0, 16:32] = 1.0
  t[1, ::5] = 0.0
  t[1, 1::7] = 1.0
  xy = ImageDiTTokenizer.get_grid([g, g], "xy").unsqueeze(0).repeat(B, 1, 1)
  ij = ImageDiTTokenizer.get_grid([g, g], "ij").unsqueeze(0).repeat(B, 1, 1)
  with torch.no_grad():
    out = m(DiTModelInputs(z_t=z_tok, t=t, token_coordinates_xy=xy, token_coordinates_ij=ij))
    t_emb = m.t_emb(t)
    t_sin = m.t_emb.embed(t)
    tprobe = torch.tensor([0.0, 5e-4, 1e-3, 1.1e-3, 0.01, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0])
    tprobe_sin = m.t_emb.embed(tprobe)
    tprobe_out = m.t_emb(tprobe)
    h = m.pos_emb(m.patch_emb(z_tok), xy, ij)
    after_embed = h.clone()
    if m.rel_pos_emb is not None:
      m.rel_pos_emb.set_state(xy.unsqueeze(1), ij.unsqueeze(1))
    blocks = []
    for blk in m.blocks:
      h = blk(h, t_emb, rel_pos_emb=m.rel_pos_emb)
      blocks.append(h.clone())
    if m.rel_pos_emb is not None:
      m.rel_pos_emb.del_state()
  sd = {f"sd/{k}": v for k, v in m.state_dict().items()}
  arrays = dict(
      sd,
      x_img=x_img,
      z_tokens=z_tok,
      t=t,
      coords_xy=xy,
      coords_ij=ij,
      out=out,
      mean_tokens=out[..., :d_in],
      logvar_tokens=out[..., d_in],
      t_emb=t_emb,
      t_sinusoid=t_sin,
      temb_probe_t=tprobe,
      temb_probe_sinusoid=tprobe_sin,
      temb_probe_out=tprobe_out,
      after_patch_pos_embed=after_embed,
      **{f"block_out/{i}": b for i, b in enumerate(blocks)},
  )
  conf = dict(
      form=form,
      dit_cfg=asdict(cfg),
      image=[B, C, H, W],
      patch=P,
      token_grid=[g, g],
      d_in=d_in,
      d_out=d_out,
      init_seed=seed,
      data_seed=seed + 100,
      redrawn_zero_init_params=redrawn,
      perturbed_norm_params=perturbed,
      n_params=sum(p.numel() for p in m.parameters()),
      modules=str(m),
  )
  save(fname, arrays, conf)


def preset_counts():
  presets = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
  res = {}
  for form in ("dit", "lightning_dit"):
    for name, (d, depth, heads) in presets.items():
      for label, (C, P, grid) in {
          "mnist_sudoku_252_1ch_p2_no_uncertainty": (1, 2, 126),
          "latent_32x32x4_p2": (4, 2, 16),
      }.items():
        d_in = C * P * P
        with torch.device("meta"):
          m = DiT(dit_cfg(form, d, depth, heads), StubTokenizer(d_in, d_in, (grid, grid)))
        res[f"{form}/{name}/{label}"] = dict(
            n_params=sum(p.numel() for p in m.parameters()),
            d_hid=d,
            depth=depth,
            heads=heads,
            d_in=d_in,
            d_out=d_in,
            ffn_hidden=m.blocks[0].mlp.d_hid,
        )
  return res


def make_flows():
  tg = torch.tensor([0.0, 1e-3, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.999, 1.0])
  T = len(tg)
  gen = torch.Generator().manual_seed(7)
  x0 = torch.randn(T, 1, 4, 4, generator=gen)
  eps = torch.randn(T, 1, 4, 4, generator=gen)
  model_out = torch.randn(T, 1, 4, 4, generator=gen)
  noise = torch.randn(T, 1, 4, 4, generator=gen)
  v_theta = torch.rand(T, 1, 4, 4, generator=gen)
  s_frac = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.9])
  sg = tg * s_frac
  flows = {
      "rectified": (F.RectifiedFlowCfg(), "ut"),
      "cosine": (F.CosineFlowCfg(), "ut"),
      "diffusion_cosine": (F.DiffusionCfg(beta_schedule=CosineCfg()), "eps"),
      "diffusion_cosine_simple_diffusion": (
          F.DiffusionCfg(beta_schedule=CosineSimpleDiffusionCfg()),
          "eps",
      ),
      "diffusion_linear": (F.DiffusionCfg(beta_schedule=LinearCfg()), "eps"),
      "diffusion_linear_v": (F.DiffusionCfg(beta_schedule=LinearCfg()), "v"),
      "continuous_linear_beta": (F.ContinuousLinearBetaFlowCfg(), "eps"),
      "continuous_cosine_logsnr": (F.ContinuousCosineLogSNRFlowCfg(), "eps"),
  }
  arrays = dict(t=tg, s=sg, x0=x0, eps=eps, model_out=model_out, noise=noise, v_theta_in=v_theta)
  conf = dict(flows={}, errors={})
  b4 = lambda a: a.view(-1, 1, 1, 1)
  for key, (cfg, param) in flows.items():
    conf["flows"][key] = dict(cfg_class=type(cfg).__name__, cfg=asdict(cfg), parameterization=param)
    try:
      fl = F.get_flow(cfg, param)
    except Exception as e:
      conf["errors"][f"{key}/build"] = f"{type(e).__name__}: {e}"
      continue

    def rec(name, fn):
      try:
        with torch.no_grad():
          arrays[f"{key}/{name}"] = fn()
      except Exception as e:
        conf["errors"][f"{key}/{name}"] = f"{type(e).__name__}: {e}"

    ta = fl.adjust_time(tg.clone())
    sa = fl.adjust_time(sg.clone())
    arrays[f"{key}/t_adj"] = ta
    arrays[f"{key}/s_adj"] = sa
    for fn in ("a", "a_prime", "b", "b_prime", "logsnr_t", "a_b_prime_minus_a_prime_b"):
      rec(fn, lambda fn=fn: getattr(fl, fn)(ta.clone()))
    for alpha in (0.0, 1.0):
      rec(
          f"sigma_small_a{alpha:g}",
          lambda alpha=alpha: fl.sigma_small(ta.clone(), sa.clone(), alpha),
      )
      rec(
          f"sigma_large_a{alpha:g}",
          lambda alpha=alpha: fl.sigma_large(ta.clone(), sa.clone(), alpha),
      )
      rec(f"gamma_a{alpha:g}", lambda alpha=alpha: fl.gamma(ta.clone(), sa.clone(), alpha))
    T4, S4 = b4(ta), b4(sa)
    rec("zt", lambda: fl.get_zt(T4, eps=eps, x=x0))
    zt = arrays.get(f"{key}/zt")
    if zt is None:
      continue
    rec("ut_from_eps_x", lambda: fl.get_ut(T4, eps=eps, x=x0))
    rec("v_from_eps_x0", lambda: fl.get_v(T4, eps=eps, x0=x0))
    # model-output conversions (model_out interpreted in the flow's parameterization)
    if param == "eps":
      rec("x_from_out", lambda: fl.get_x(T4, eps=model_out, zt=zt))
      rec("ut_from_out", lambda: fl.get_ut(T4, eps=model_out, zt=zt))
      rec("v_from_out", lambda: fl.get_v(T4, eps=model_out, zt=zt))
    elif param == "ut":
      rec("x_from_out", lambda: fl.get_x(T4, ut=model_out, zt=zt))
      rec("eps_from_out", lambda: fl.get_eps(T4, ut=model_out, zt=zt))
    else:
      rec("x_from_out", lambda: fl.get_x(T4, v=model_out, zt=zt))
      rec("eps_from_out", lambda: fl.get_eps(T4, v=model_out, zt=zt))
    for alpha in (0.0, 1.0):
      for var in ("fixed_small", "fixed_large", "learned_range"):
        fl.cfg = dataclasses.replace(cfg, variance=var)

        def step(alpha=alpha, var=var):
          p = fl.conditional_p(
              model_out, zt, T4, S4, alpha, 1, v_theta=v_theta if var == "learned_range" else None
          )
          return p

        try:
          with torch.no_grad():
            p = step()
            arrays[f"{key}/p_a{alpha:g}_{var}/mean"] = p.mean
            arrays[f"{key}/p_a{alpha:g}_{var}/var"] = p.var
            arrays[f"{key}/p_a{alpha:g}_{var}/z_s"] = p.mean + p.std * noise
        except Exception as e:
          conf["errors"][f"{key}/p_a{alpha:g}_{var}"] = f"{type(e).__name__}: {e}"
      fl.cfg = cfg
    # reverse step with a per-sample sigma_theta (uncertainty head) added
    rec(
        "p_a1_fixed_small_sigmatheta/mean",
        lambda: fl.conditional_p(
            model_out, zt, T4, S4, 1.0, 1, sigma_theta=0.3 * torch.ones_like(zt)
        ).mean,
    )
    rec(
        "p_a1_fixed_small_sigmatheta/var",
        lambda: fl.conditional_p(
            model_out, zt, T4, S4, 1.0, 1, sigma_theta=0.3 * torch.ones_like(zt)
        ).var,
    )
    if isinstance(fl, F.Diffusion) if hasattr(F, "Diffusion") else False:
      arrays[f"{key}/betas"] = fl.betas
      arrays[f"{key}/alphas_bar"] = fl.alphas_bar
  conf["sigma_theta_value"] = 0.3
  conf["note"] = (
      "t/s grid; z_s = p.mean + p.std * noise; DiagonalGaussian clamps var to [exp(-30), exp(20)]"
  )
  save("flows.npz", arrays, conf)


def make_samplers():
  """Drive the framework's SamplingSchedule classes directly (no model, no Lightning/Hydra):
  each step feeds the current per-variable time map t [B, V] and a fixed per-step sigma_theta [B, V]
  (drawn here, stored) and records next_t and should_denoise, exactly like the inference sampler's loop
  `next_t, should_denoise = schedule(t, sigma_theta)` while `schedule.is_unfinished_mask.any()`."""
  import importlib
  # register the parent packages as empty package objects so that their __init__ files (which import
  # datasets, evaluation, torchmetrics/matplotlib plotting) are not run; sampling_schedule/ is imported as is
  base = _pkg.__path__[0]
  for sub in ("benchmark", "benchmark/evaluation", "benchmark/evaluation/inference_sampler"):
    name = "spatialreasoners." + sub.replace("/", ".")
    if name not in sys.modules:
      m = types.ModuleType(name)
      m.__path__ = [os.path.join(base, sub)]
      sys.modules[name] = m
  ss = importlib.import_module(
      "spatialreasoners.benchmark.evaluation.inference_sampler.sampling_schedule"
  )

  class StubVM:  # the schedules only read variable_mapper.num_variables

    def __init__(self, n):
      self.num_variables = n

  B, V = 2, 16
  flow = F.get_flow(F.RectifiedFlowCfg(), "ut")
  cases = {
      "raster": (ss.RasterCfg(num_steps=2), ss.Raster),
      "adaptive_inverse": (
          ss.AdaptiveInverseCfg(max_steps=6, alpha=1.0, min_step_size=1e-3),
          ss.AdaptiveInverse,
      ),
      "adaptive_inverse_divthr": (
          ss.AdaptiveInverseCfg(max_steps=8, alpha=1.0, div_threshold=0.5),
          ss.AdaptiveInverse,
      ),
      "adaptive_softmax": (
          ss.AdaptiveSoftmaxCfg(max_steps=6, alpha=1.0, scale=1.0),
          ss.AdaptiveSoftmax,
      ),
      "mask_git": (ss.MaskGITCfg(num_steps_per_group=2, num_groups=4), ss.MaskGIT),
  }

  # adaptive_softmax has a broadcasting bug for batch > 1 (t_next.mul_(x) with x of shape [B, B]),
  # so it is also run with batch 1, once per batch row (same sigma_theta rows).
  # MaskGIT reads self.num_patches, which nothing defines; a subclass adds num_patches = num_variables.
  class MaskGITWithNumPatches(ss.MaskGIT):

    @property
    def num_patches(self):
      return self.num_variables

  cases["mask_git"] = (cases["mask_git"][0], MaskGITWithNumPatches)
  runs = [(k, c, cl, B, None) for k, (c, cl) in cases.items()]
  runs += [
      (f"adaptive_softmax_b1_row{r}", cases["adaptive_softmax"][0], ss.AdaptiveSoftmax, 1, r)
      for r in range(B)
  ]
  arrays, conf = {}, dict(
      cases={},
      errors={},
      B=B,
      V=V,
      flow="rectified/ut/fixed_small",
      sigma_theta_rule="step k: sigma_theta = exp(N(0,1)) from torch.Generator seed 1000+k (same for all cases)",
      construction="cls(cfg, batch_size, 'cpu', model_flow, StubVM(V)); mask=None; torch.manual_seed(5) before construction",
  )
  for key, cfg, cls, Bk, row in runs:
    conf["cases"][key] = dict(
        cfg_class=type(cfg).__name__, cfg=asdict(cfg), batch=Bk, sigma_row=row
    )
    try:
      torch.manual_seed(5)
      cfg = dataclasses.replace(cfg)
      sch = cls(cfg, Bk, torch.device("cpu"), flow, StubVM(V))
      if hasattr(sch, "patch_order"):
        arrays[f"{key}/patch_order"] = sch.patch_order
      t = torch.ones(Bk, V)
      ts, dm, sg = [t.clone()], [], []
      k = 0
      while bool(sch.is_unfinished_mask.any()) and k < 200:
        g = torch.Generator().manual_seed(1000 + k)
        sig = torch.exp(torch.randn(B, V, generator=g))
        if row is not None:
          sig = sig[row : row + 1]
        with torch.no_grad():
          nt, d = sch(t, sig)
        sg.append(sig)
        dm.append(d.clone())
        ts.append(nt.clone())
        t = nt
        k += 1
      arrays[f"{key}/t_steps"] = torch.stack(ts)  # [steps+1, B, V], row 0 = initial ones
      arrays[f"{key}/should_denoise"] = torch.stack(dm)  # [steps, B, V] bool
      arrays[f"{key}/sigma_theta"] = torch.stack(sg)  # [steps, B, V]
      conf["cases"][key]["num_steps"] = k
    except Exception as e:
      import traceback

      conf["errors"][key] = f"{type(e).__name__}: {e} | " + traceback.format_exc()[-600:]
  save("samplers.npz", arrays, conf)


def make_tokenizer():
  """The framework's image tokenizer for the DiT (`ImageDiTTokenizer` with an `ImageVariableMapper`)
  on a 2-channel 12x12 image: variables of 4x4 pixels (3x3 = 9), 2x2 tokens per variable (36).
  Stores how it packs pixels into tokens, the token coordinates, the per-token times and how it
  reassembles a model output into variables and the image."""
  from spatialreasoners.variable_mapper.image_variable_mapper import (
      ImageVariableMapper,
      ImageVariableMapperCfg,
  )
  from spatialreasoners.denoising_model.tokenizer.dit_tokenizer.image_dit_tokenizer import (
      ImageDiTTokenizerCfg,
  )

  torch.manual_seed(7)
  shape, patch, n, B = (2, 12, 12), 4, 2, 2
  vm = ImageVariableMapper(ImageVariableMapperCfg(variable_patch_size=patch), shape)
  arrays = {}
  conf = dict(
      image_shape_chw=list(shape),
      variable_patch_size=patch,
      num_tokens_per_spatial_dim=n,
      batch=B,
      seed=7,
      cases={},
  )
  x = torch.randn(B, *shape)
  t_var = torch.rand(B, 1, vm.num_variables)
  arrays["x_img"] = x
  arrays["t_var"] = t_var[:, 0]
  variables = vm.unstructured_tensor_to_variables(x)
  arrays["variables"] = variables
  for name, kw in (
      ("uncertainty", dict(predict_uncertainty=True)),
      ("uncertainty_variance", dict(predict_uncertainty=True, predict_variance=True)),
  ):
    tok = ImageDiTTokenizer(ImageDiTTokenizerCfg(num_tokens_per_spatial_dim=n), vm, **kw)
    inputs = tok.variables_to_model_inputs(variables[:, None], t_var)
    out = torch.randn(B, inputs.z_t.shape[1], tok.model_d_out)
    pred = tok.model_outputs_to_variable_predictions(out, B, 1)
    arrays[f"{name}/z_tokens"] = inputs.z_t
    arrays[f"{name}/t_tokens"] = inputs.t
    arrays[f"{name}/coords_xy"] = inputs.token_coordinates_xy[0]
    arrays[f"{name}/coords_ij"] = inputs.token_coordinates_ij[0]
    arrays[f"{name}/model_out"] = out
    arrays[f"{name}/mean_variables"] = pred.mean_theta[:, 0]
    arrays[f"{name}/mean_img"] = vm.variables_tensor_to_unstructured(pred.mean_theta[:, 0])
    arrays[f"{name}/logvar_variables"] = pred.logvar_theta[:, 0]
    if pred.variance_theta is not None:
      arrays[f"{name}/v_variables"] = pred.variance_theta[:, 0]
    conf["cases"][name] = dict(
        kw,
        model_d_in=tok.model_d_in,
        model_d_data=tok.model_d_data,
        model_d_out=tok.model_d_out,
        token_grid_size=tok.token_grid_size,
    )
  save("image_dit_tokenizer.npz", arrays, conf)


if __name__ == "__main__":
  which = sys.argv[1:] or ["dit", "lightning_dit", "flows", "counts", "samplers", "tokenizer"]
  if "samplers" in which:
    make_samplers()
  if "tokenizer" in which:
    make_tokenizer()
  if "dit" in which:
    make_dit("dit", "dit_tiny.npz", 0)
  if "lightning_dit" in which:
    make_dit("lightning_dit", "lightning_dit_tiny.npz", 1)
  if "flows" in which:
    make_flows()
  if "counts" in which:
    c = preset_counts()
    with open(os.path.join(OUT, "preset_param_counts.json"), "w") as f:
      json.dump(
          dict(
              counts=c,
              versions=VERS,
              note="DiT class built on the meta device; "
              "LightningDiT form = RMSNorm + qk-RMSNorm + lightningdit_swiglu (mlp_ratio 8/3) + RoPE",
          ),
          f,
          indent=1,
      )
    print(json.dumps(c, indent=0))
