"""The one generation seam: ``Settings`` and the ``Generator`` that every front end calls.

``t2i generate``, the HTTP server, the quality report and the benchmarks all do the same three things:

    gen = load_generator("sd3-shapes")                   # t2i.pipelines.folders
    s = gen.settings(steps=8, guidance=4.0, size=64)    # validated here, once, for every front end
    images = gen.generate(prompts, seeds, s)             # (B, 3, S, S) floats in [0, 1]

``Settings`` is frozen and hashable: the server batches requests whose settings are equal by using them as the
batch key, and nothing about a request is written into the shared pipeline (the pipelines take their settings
per call). What differs between families (sizes, the negative prompt, how many sampler steps a call makes) is a
method of the generator class, so no caller asks which family it holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from t2i.diffusion import check_guidance_interval, check_sampling_setting

# ``progress(done, total)`` after every sampler step of a ``Generator.generate`` call; it may raise to abort the call
# (the server does, when every client of a batch has gone away).
Progress = Callable[[int, int], None]


class SettingsError(ValueError):
    """A setting a generator cannot honour; ``field`` names it (``size``, ``sampler``, ...) so that each front end
    can point at its own spelling of it (a CLI flag, a JSON field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _frozen(value: Any) -> Any:
    """``value`` with lists turned into tuples (recursively), so that settings hash."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class Settings:
    """How to sample one batch: shared fields, the negative prompt, and the family's own options (``extra``)."""

    steps: int
    guidance: float  # classifier-free guidance scale; 1 turns guidance off
    sampler: str  # a key of t2i.diffusion.SAMPLERS
    size: int  # square side in pixels
    negative: str = ""  # negative prompt (families that support one)
    extra: tuple[tuple[str, Any], ...] = ()  # family options (shift, slg_scale, prior_steps, ...), sorted by name

    def __post_init__(self):
        extra = self.extra.items() if isinstance(self.extra, Mapping) else self.extra
        object.__setattr__(self, "extra", tuple(sorted((str(k), _frozen(v)) for k, v in extra)))

    @property
    def cfg(self) -> float:
        """The guidance scale under its old name (``guidance`` is the public one)."""
        return self.guidance

    @property
    def options(self) -> dict[str, Any]:
        """The family options as a dict."""
        return dict(self.extra)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``; ``extra`` given as a mapping is merged into the current options."""
        if isinstance(changes.get("extra"), Mapping):
            changes["extra"] = {**self.options, **changes["extra"]}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON fields: the shared ones, the negative prompt when set, then the family options."""
        d: dict[str, Any] = {"steps": self.steps, "guidance": self.guidance, "sampler": self.sampler}
        d["size"] = self.size
        if self.negative:
            d["negative"] = self.negative
        return {**d, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.extra}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Settings:
        """From ``to_dict`` output or a model folder's ``defaults`` (whose older files call the scale ``cfg``)."""
        d = dict(d)
        guidance = d.pop("guidance", None)
        cfg = d.pop("cfg", None)
        return cls(int(d.pop("steps")), float(guidance if guidance is not None else cfg), str(d.pop("sampler")),
                   int(d.pop("size")), str(d.pop("negative", "")), extra=d)  # fmt: skip

    def describe(self, model: str, seed: int) -> dict[str, Any]:
        """The settings of one image as A1111-style ``parameters`` fields (PNG metadata, server responses)."""
        from t2i import __version__

        return {"Steps": self.steps, "Sampler": self.sampler, "CFG scale": self.guidance, "Seed": seed,
                "Size": f"{self.size}x{self.size}", "Model": model,
                **{k.replace("_", " ").capitalize(): v for k, v in self.extra},
                "Version": f"t2i {__version__}"}  # fmt: skip


def _check_settings(settings: Mapping[str, Any]) -> None:
    """``SettingsError`` for the first invalid entry; a name's last part (``prior_steps``: steps) says its kind."""
    for field, value in settings.items():
        try:
            check_sampling_setting(field.rpartition("_")[2], value, field)
        except ValueError as err:
            raise SettingsError(field, str(err)) from None


class Generator:
    """Prompts and seeds in, images ``(B, 3, H, W)`` in [0, 1] out. Subclasses: ``SD3Generator``,
    ``UnCLIPGenerator``; build one with ``t2i.pipelines.folders.load_generator``."""

    kind: str  # the family: "sd3" or "unclip"
    name: str
    defaults: Settings
    supports_negative: bool = True
    supports_edits: bool = False  # img2img and inpainting (``generate(..., init_images=, masks=)``)
    supports_controls: bool = False  # ControlNet controls (``generate(..., controls=)``)
    precision: str = "fp32"  # how the denoisers run: "fp32", or "bf16" autocast (``t2i.pipelines.folders``)
    precision_note: str = ""  # why ``precision`` differs from the model folder's, when it does
    _presets: dict[str, Settings] | None = None

    def presets(self) -> dict[str, Settings]:
        """Named settings (``t2i generate --preset``): the model folder's ``presets``, or SD3's for SD3 files."""
        return dict(self._presets or {})

    def describe_sizes(self) -> str:
        raise NotImplementedError

    def size_ok(self, size: int) -> bool:
        raise NotImplementedError

    def settings(self, preset: str | None = None, **overrides: Any) -> Settings:
        """The defaults (or ``preset``) with ``overrides`` applied and checked; ``None`` values are ignored, so a
        front end passes its optional fields straight through. ``cfg`` is accepted for ``guidance``. Family
        options (``shift``, ``prior_steps``, ...) go in ``extra`` as a mapping. Raises ``SettingsError``."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "cfg" in overrides:
            if "guidance" in overrides:
                raise SettingsError("guidance", "give the guidance scale once (guidance, or its old name cfg)")
            overrides["guidance"] = overrides.pop("cfg")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
        if unknown:
            raise SettingsError(sorted(unknown)[0], f"unknown setting(s) {sorted(unknown)}; valid: "
                                f"{[f.name for f in dataclasses.fields(Settings)]}")  # fmt: skip
        base = self.defaults
        if preset is not None:
            presets = self.presets()
            if preset not in presets:
                raise SettingsError("preset", f"unknown preset {preset!r} for {self.name}; choose one of "
                                    f"{sorted(presets) or '(none)'}")  # fmt: skip
            base = presets[preset]
        s = base.replace(**overrides)
        self.check(s)
        return s

    def check(self, s: Settings) -> None:
        """Raise ``SettingsError`` naming the first field of ``s`` this generator cannot honour."""
        _check_settings({"steps": s.steps, "guidance": s.guidance, "sampler": s.sampler})
        if not (isinstance(s.size, int) and self.size_ok(s.size)):
            raise SettingsError("size", f"{self.name} makes {self.describe_sizes()}; got size {s.size!r}")
        if s.negative and not self.supports_negative:
            raise SettingsError("negative", f"{self.name} does not take a negative prompt: {self.negative_reason}")
        opts = s.options
        if "strength" in opts and not (isinstance(opts["strength"], int | float) and 0 < opts["strength"] <= 1):
            raise SettingsError("strength", f"strength must lie in (0, 1] (1 repaints fully), got {opts['strength']}")
        if "mask_blur" in opts and not (isinstance(opts["mask_blur"], int | float) and opts["mask_blur"] >= 0):
            raise SettingsError("mask_blur", f"mask_blur is a Gaussian sigma in pixels >= 0, got {opts['mask_blur']}")
        if opts.get("controlnet_layout", "reference") not in ("reference", "diffusers"):
            raise SettingsError("controlnet_layout", "controlnet_layout is 'reference' (every MMDiT block, the sd3.5 "
                                f"reference) or 'diffusers', got {opts['controlnet_layout']!r}")  # fmt: skip

    negative_reason = ""

    def total_steps(self, s: Settings) -> int:
        """How many times ``generate(..., s, callback=...)`` calls its callback."""
        return s.steps

    def generate(self, prompts: list[str], seeds: list[int], settings: Settings, *, init_images=None, masks=None,
                 controls=None, progress: bool = False, callback: Progress | None = None) -> Tensor:  # fmt: skip
        """Images ``(B, 3, S, S)`` in [0, 1]; image ``k`` depends only on ``prompts[k]``, ``seeds[k]`` and the
        settings, not on the rest of the batch (up to float rounding).

        ``init_images`` (PIL images or a ``(B, 3, S, S)`` tensor in [0, 1]) turns it into img2img at the settings'
        ``strength`` (default 0.8); ``masks`` (white / 1 = repaint) into inpainting, softened by ``mask_blur``.
        Families without edits (``supports_edits``) refuse them. ``controls`` are ControlNet controls
        (``t2i.pipelines.control.Control``), summed, for families that take them (``supports_controls``)."""
        raise NotImplementedError

    def check_controls(self, controls) -> None:
        """Raise ``SettingsError`` when ``controls`` cannot be honoured (no ControlNet, or a family without)."""
        if not controls:
            return
        if not self.supports_controls:
            raise SettingsError("control", f"{self.name} takes no ControlNet controls (SD3-family models do)")
        from .control import pick_controlnet

        for c in controls:
            try:
                pick_controlnet(c, self.controlnets())
            except ValueError as err:
                raise SettingsError("controlnet", str(err)) from None

    def controlnets(self) -> list:
        """The ControlNets this generator holds (``controls`` pick theirs by kind)."""
        return []

    def check_edits(self, init_images, masks) -> None:
        if (init_images is not None or masks is not None) and not self.supports_edits:
            raise SettingsError("init_image", f"{self.name} does not edit images (no img2img or inpainting)")
        if masks is not None and init_images is None:
            raise SettingsError("mask", "inpainting needs the image to keep: give an init image with the mask")


class SD3Generator(Generator):
    kind = "sd3"
    supports_edits = True
    supports_controls = True

    def __init__(self, pipe, name: str, defaults: Settings, sizes: tuple[int, int, int]):
        self.pipe, self.name, self.defaults = pipe, name, defaults
        self.min_size, self.max_size, self.multiple = sizes

    def describe_sizes(self) -> str:
        return (f"square images of {self.min_size}-{self.max_size} px in steps of {self.multiple} (trained at "
                f"{self.defaults.size})")  # fmt: skip

    def size_ok(self, size: int) -> bool:
        return self.min_size <= size <= self.max_size and size % self.multiple == 0

    def check(self, s: Settings) -> None:
        super().check(s)
        opts = s.options
        scale = opts.get("slg_scale", self.pipe.preset.slg_scale)
        if not (isinstance(scale, int | float) and math.isfinite(scale)):
            raise SettingsError("slg_scale", f"slg_scale must be a finite number (0 turns it off), got {scale!r}")
        layers = opts.get("slg_layers", self.pipe.preset.slg_layers)
        depth = self.pipe.transformer.cfg.depth
        if scale and not (
            isinstance(layers, tuple | list) and layers and all(isinstance(i, int) and 0 <= i < depth for i in layers)
        ):
            # layers past the last block would skip nothing: guidance that silently does nothing
            raise SettingsError("slg_layers", f"{self.name} has {depth} MMDiT blocks; slg_layers must be block "
                                f"indices in 0..{depth - 1}, got {layers!r}")  # fmt: skip
        if opts.get("guidance_interval") is not None:
            try:
                check_guidance_interval(opts["guidance_interval"])
            except ValueError as err:
                raise SettingsError("guidance_interval", str(err)) from None

    def total_steps(self, s: Settings, edit: bool = False) -> int:
        """The steps of a call: all of them, or for an edit the last ``strength`` of them (as img2img runs)."""
        if not edit:
            return s.steps
        return len(self.pipe.schedule(s.steps, 1.0, float(s.options.get("strength", 0.8)))[1]) - 1

    def controlnets(self) -> list:
        return list(self.pipe.controlnets)

    def generate(self, prompts, seeds, settings, *, init_images=None, masks=None, controls=None, progress=False,
                 callback=None):  # fmt: skip
        s = settings
        self.check(s)  # a hand-made Settings gets the same checks as one from settings()
        self.check_edits(init_images, masks)
        self.check_controls(controls)
        sd3 = {
            k: v for k, v in s.extra if k in ("shift", "slg_scale", "slg_layers", "slg_window", "guidance_interval")
        }
        edit = {}
        if init_images is not None:
            edit = {"init_image": init_images, "strength": float(s.options.get("strength", 0.8))}
            if masks is not None:
                edit.update(mask_image=masks, mask_blur=float(s.options.get("mask_blur", 0.0)))
        if controls:
            edit.update(controls=list(controls), controlnet_layout=s.options.get("controlnet_layout", "reference"))
        total = self.total_steps(s, edit="init_image" in edit)
        step = None if callback is None else lambda d: callback(d["i"] + 1, total)
        return self.pipe(prompts, negative_prompt=s.negative, seeds=list(seeds), height=s.size, width=s.size,
                         steps=s.steps, guidance=s.guidance, sampler=s.sampler, output="tensor", progress=progress,
                         callback=step, **sd3, **edit)  # fmt: skip


class UnCLIPGenerator(Generator):
    kind = "unclip"
    supports_negative = False
    negative_reason = "unCLIP models guide with a null caption"

    def __init__(self, pipe, name: str, defaults: Settings):
        self.pipe, self.name, self.defaults = pipe, name, defaults
        self.sizes = [st.size for st in pipe.stages]

    def describe_sizes(self) -> str:
        return f"{' or '.join(map(str, self.sizes))} px images (its cascade stages)"

    def size_ok(self, size: int) -> bool:
        return size in self.sizes

    # the options that set the prior's and the upsamplers' own sampling (the call's steps etc. are the base stage's)
    part_options = ("prior_steps", "prior_sampler", "prior_guidance", "prior_candidates", "upsampler_steps",
                    "upsampler_sampler")  # fmt: skip

    def check(self, s: Settings) -> None:
        super().check(s)
        _check_settings({k: v for k, v in s.options.items() if k in self.part_options})

    def _prior_steps(self, s: Settings) -> int:
        return int(s.options.get("prior_steps", self.pipe.prior.steps))

    def _prior_settings(self, s: Settings) -> dict:
        """The prior samples embeddings, not images: it keeps its own sampler, steps, guidance and candidates per
        prompt (the model folder's ``prior`` entry) unless the ``prior_sampler`` / ``prior_steps`` /
        ``prior_guidance`` / ``prior_candidates`` options say otherwise; ``sampler``, ``steps`` and ``guidance`` are
        the decoder's."""
        prior = self.pipe.prior
        return {"steps": self._prior_steps(s), "sampler": str(s.options.get("prior_sampler", prior.sampler)),
                "guidance": float(s.options.get("prior_guidance", prior.guidance)),
                "candidates": int(s.options.get("prior_candidates", prior.num_candidates))}  # fmt: skip

    def _stage_settings(self, s: Settings) -> dict:
        """``steps``, ``sampler`` and ``guidance`` are the base stage's; the upsamplers keep the folder's own
        settings (each stage's entry in model.json) unless ``upsampler_steps`` / ``upsampler_sampler`` say
        otherwise: a super-resolution stage is trained and tuned apart, and usually needs fewer steps."""
        n = len(self.sizes) - 1
        return {"steps": [s.steps] + [s.options.get("upsampler_steps")] * n,
                "sampler": [s.sampler] + [s.options.get("upsampler_sampler")] * n,
                "guidance": [s.guidance] + [None] * n}  # fmt: skip

    def total_steps(self, s: Settings) -> int:
        """The prior's steps, then each stage's up to ``s.size``."""
        steps = self._stage_settings(s)["steps"]
        stages = self.pipe.stages[: self.sizes.index(s.size) + 1]
        return self._prior_steps(s) + sum(st.steps if n is None else n for st, n in zip(stages, steps, strict=False))

    def generate(self, prompts, seeds, settings, *, init_images=None, masks=None, controls=None, progress=False,
                 callback=None):  # fmt: skip
        from t2i.diffusion import Seeds

        s = settings
        self.check(s)
        self.check_edits(init_images, masks)
        self.check_controls(controls)
        total, done = self.total_steps(s), [0]

        def step(_):
            done[0] += 1
            callback(done[0], total)

        step = None if callback is None else step
        seeds = Seeds(list(seeds))
        embed, tokens, mask = self.pipe.image_embeds_from_text(
            list(prompts), seeds, **self._prior_settings(s), callback=step
        )
        images = self.pipe.decode(embed, seeds=seeds, text_tokens=tokens, text_mask=mask,
                                  stop_stage=self.sizes.index(s.size), **self._stage_settings(s),
                                  callback=step)  # fmt: skip
        return ((images.float() + 1) / 2).clamp(0, 1)
