# One command runs the tests (`make test`); one runs the main job (`make generate`).
# Tests run in 2 processes of 1 thread each: more threads than cores makes OpenMP spin-wait and slows the suite
# more than tenfold on a 2-core machine.
# Both create .venv on first use: torch is pinned to the CPU wheel (`torch==2.13.0`) before anything else is
# installed, so no dependency can pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: browser install test test-slow lint format generate quality train-defaults export-defaults bench-samplers \
	bench-shapes bench-dalle2 bench-serve train-controlnet bench-controlnet clean

# `make generate` needs only the runtime dependencies; `make test` adds the dev and interop extras.
$(RUN_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	@touch $(RUN_STAMP)

$(STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install -q -e ".[dev,interop]"
	@touch $(STAMP)

install: $(STAMP)

# The web page's test drives Debian's chromium; install it with its driver when missing and allowed (root + apt).
# Without them that one test is skipped with the reason.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the page test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			>/dev/null) || echo "warning: could not install chromium; the page test will be skipped"; \
	else echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver): the page test is skipped"; fi

test: $(STAMP) browser
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -m slow
	FUZZ_EXAMPLES=400 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 tests/fuzz

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The main job: images for the example prompts with the shipped default model (sd3-shapes), into out/.
generate: $(RUN_STAMP)
	$(BIN)/t2i generate --from-file examples/prompts.txt -n 4 --seed 0 -o out/

# docs/quality.md (+ .json and sample grids in docs/images/): both shipped models on the shapes benchmark.
quality: $(RUN_STAMP)
	$(BIN)/t2i eval quality --models sd3-shapes unclip-shapes --out docs/quality.md

# Retrain the default models from scratch (configs/default, seed 0; hours on 2 CPU cores), resuming where a
# previous run stopped, then write models/. The stages that do not depend on each other could run side by side.
# The turbo's last 300 steps: its adversarial run continued from step 1000 with re-noising times drawn higher.
TURBO_HI = run.name=sd3_turbo_ladd_hi run.steps=1300 task.params.disc_time_logit_mean=1.0
# The unCLIP base decoder's third stage: configs/default/decoder_more.yaml again, 2000 steps from its own EMA weights.
DECODER_MORE2 = run.name=default_decoder_more2 run.steps=2000 \
	model.init_from=runs/default_decoder_more/checkpoints/step_00003000/ema.safetensors

train-defaults: $(RUN_STAMP)
	$(BIN)/t2i train configs/default/clip.yaml --resume
	$(BIN)/t2i train configs/default/caption.yaml --resume
	$(BIN)/t2i train configs/default/vae.yaml --resume
	$(BIN)/t2i train configs/default/sd3.yaml --resume
	$(BIN)/t2i train configs/default/sd3_polish.yaml --resume
	$(BIN)/t2i train configs/default/sd3_words.yaml --resume
	$(BIN)/t2i train configs/default/sd3_words_more.yaml --resume
	$(BIN)/t2i train configs/distill/sd3_shapes_consistency.yaml --resume
	$(BIN)/t2i train configs/distill/sd3_shapes_turbo_ladd.yaml --resume
	if [ -d runs/sd3_turbo_ladd_hi/checkpoints ]; then from=--resume; \
	else from="--resume-from runs/sd3_turbo_ladd/checkpoints/step_00001000"; fi; \
	$(BIN)/t2i train configs/distill/sd3_shapes_turbo_ladd.yaml $$from $(TURBO_HI)
	$(BIN)/t2i train configs/default/unclip_clip.yaml --resume
	$(BIN)/t2i train configs/default/unclip_caption.yaml --resume
	$(BIN)/t2i train configs/default/prior.yaml --resume
	$(BIN)/t2i train configs/default/decoder.yaml --resume
	$(BIN)/t2i train configs/default/decoder_more.yaml --resume
	$(BIN)/t2i train configs/default/decoder_more.yaml --resume $(DECODER_MORE2)
	$(BIN)/t2i train configs/default/sr.yaml --resume
	$(BIN)/t2i train configs/default/sr_more.yaml --resume
	$(MAKE) export-defaults

export-defaults: $(RUN_STAMP)
	$(BIN)/t2i export sd3 --transformer runs/default_sd3_words_more --out models/sd3-shapes --slg-scale 2.5 --slg-layers 2,3 --guidance-interval 0,0.8
	$(BIN)/t2i export sd3 --transformer runs/sd3_turbo_ladd_hi --name sd3-shapes-turbo --out models/sd3-shapes-turbo \
		--share-from models/sd3-shapes --sampler consistency
	$(BIN)/t2i export unclip --clip runs/default_unclip_clip --decoder runs/default_decoder_more2 --sr runs/default_sr_more \
		--out models/unclip-shapes --sampler ddpm --steps 25 --upsampler-steps 8 --prior-steps 8

# Load test of `t2i serve` on sd3-shapes: throughput and latency with dynamic batching on and off.
bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve_load.py

bench-samplers: $(STAMP)
	$(BIN)/python benchmarks/samplers.py

# The shapes ControlNet of docs/controlnet.md: object outlines steer where sd3-shapes puts the objects.
train-controlnet: $(STAMP)
	$(BIN)/t2i train configs/controlnet/sd3_shapes_outlines.yaml --resume
	$(BIN)/t2i export controlnet --run runs/controlnet_shapes_outlines --out models/sd3-shapes

bench-controlnet: $(STAMP)
	$(BIN)/python benchmarks/controlnet_shapes.py --grid docs/images/controlnet_grid.png

bench-shapes: $(STAMP)
	$(BIN)/python benchmarks/shapes_eval.py

# t2i's unCLIP Unet and prior vs DALLE2-pytorch's. dalle2-pytorch pins torchvision, so it gets its own venv with the
# same torch build installed first (see benchmarks/vs_dalle2_pytorch.py on PyPI torchvision's compiled ops).
DALLE2_VENV := .venv-dalle2
$(DALLE2_VENV)/.installed:
	@test -x $(DALLE2_VENV)/bin/python || $(PYTHON) -m venv $(DALLE2_VENV)
	$(DALLE2_VENV)/bin/pip install -q torch==2.13.0
	$(DALLE2_VENV)/bin/pip install -q "dalle2-pytorch==1.15.6" "setuptools<81" "torch==2.13.*"  # keep the CPU build
	@touch $@

bench-dalle2: $(STAMP) $(DALLE2_VENV)/.installed
	$(BIN)/python benchmarks/vs_dalle2_pytorch.py

clean:
	rm -rf $(VENV) $(DALLE2_VENV) .pytest_cache .ruff_cache *.egg-info
