# Common tasks. Variables: MODE (finetune|feature-extract), DATA_DIR, DATA_ZIP (a local copy of
# hymenoptera_data.zip for machines without internet), ARGS (more train.py options).
VENV     ?= .venv
PY       := $(VENV)/bin/python
MODE     ?= finetune
DATA_DIR ?= data/hymenoptera_data
DATA_ZIP ?= $(wildcard ../shared/data/hymenoptera_data.zip)
ARGS     ?=
TRAIN    := train.py --mode $(MODE) --data-dir $(DATA_DIR) $(if $(DATA_ZIP),--data-zip $(DATA_ZIP)) $(ARGS)

NPROC    ?= 2
.PHONY: install train-cpu train-gpu train-multi-gpu test test-fast test-slurm lint bench bench-quick wandb-sync clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

train-cpu: install  ## train on the CPU (bf16 autocast where supported)
	$(VENV)/bin/accelerate launch --quiet --config_file accelerate_configs/cpu.yaml $(TRAIN)

train-gpu: install  ## one GPU, bf16
	$(VENV)/bin/accelerate launch --quiet --config_file accelerate_configs/gpu.yaml $(TRAIN)

train-multi-gpu: install  ## DDP over NPROC GPUs of this node (NPROC CPU processes without GPUs)
	$(VENV)/bin/accelerate launch --quiet --config_file accelerate_configs/multi_gpu.yaml --num_processes $(NPROC) $(TRAIN)

# Test files run TEST_JOBS at a time (pytest-xdist; each test process then uses one thread, see tests/conftest.py).
TEST_JOBS ?= 2
test: install  ## the test suite on the CPU, without the SLURM tests (about 9 minutes on 2 cores; never apt-get or daemons)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slurm" --durations=10

test-fast: install  ## the same without the tests marked slow
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slurm and not slow"

test-slurm: install  ## only the tests on a real local two-node SLURM cluster (root: installs slurm with apt-get)
	$(PY) -m pytest -q -m slurm --durations=10

lint: install
	$(VENV)/bin/ruff check .
	if command -v shellcheck >/dev/null; then shellcheck slurm/*.sh slurm/*.sbatch .ci/run; fi

# Finetune variants measured besides the defaults: a larger batch (linear lr scaling), and that plus smaller train crops.
BENCH_VARIANTS = --variant "--batch-size 16 --lr 0.004" --variant "--batch-size 16 --lr 0.004 --train-size 160" \
	--variant "$(RECIPE)"

bench: install  ## tl against the tutorial's loop, 25 epochs x 3 seeds, plus finetune variants (about 95 min on 2 cores); writes bench/results.md
	$(PY) bench/bench.py --epochs 25 --seeds 0 1 2 --tl-args "--wandb disabled" $(BENCH_VARIANTS)

bench-quick: install  ## the same in a few minutes (2 epochs, one seed): a smoke test, not figures to quote
	$(PY) bench/bench.py --quick --tl-args "--wandb disabled"

.PHONY: bench-data bench-gpu bench-modes bench-recipes bench-levers bench-predict bench-large bench-lora
bench-data: install  ## tl's data path on generated 1k/10k/100k small-JPEG sets (memory, stream, packed; ~10 min on 2 cores); writes bench/results-data.md
	$(PY) bench/data.py --small --sizes 1000 10000 100000 --workers -1 1 --photo-sizes 2000 --max-loader-images 20000

bench-large: install  ## a timm ViT-S/16 training step, finetune and --mode lora, each with and without --grad-checkpointing: memory, speed, optimizer state, checkpoint bytes; ViT-B/16 at 2 processes, --shard-model vs DDP (~2 min on 2 cores); writes bench/results-large.md
	$(PY) bench/large.py

bench-predict: install  ## python -m tl.predict: images/s at 1 vs 2 processes (one core each) and peak RSS at 10k vs 100k small JPEGs (~7 min on 2 cores); writes bench/results-predict.md
	$(PY) bench/predict.py

bench-modes: install  ## best val acc on hymenoptera in memory, stream and packed modes over 3 seeds (5 epochs; ~15 min on 2 cores); writes bench/results-modes.md
	$(PY) bench/seeds.py --epochs 5 --title "data modes, best val accuracy over seeds" --out bench/results-modes.md \
		--config "memory=--data-mode memory" --config "stream=--data-mode stream" \
		--config "packed=--data-dir {pack} --data-mode stream"

RECIPE ?= --freeze-epochs 3 --optimizer adamw --weight-decay 0.05 --schedule cosine --warmup-epochs 1 --backbone-lr-scale 0.1 --label-smoothing 0.1
# The levers of docs/levers.md on top of RECIPE; {imbalanced}: train/bees cut to 1/5 (bench/seeds.py), val untouched.
LEVERS_ALL = --augment trivialaugment --random-erasing 0.25 --mixup 0.8 --cutmix 1.0 --ema 0.99
bench-recipes: install  ## RECIPE and the accuracy levers against the tutorial's scenarios, hymenoptera and an imbalanced cut, 25 epochs x 3 seeds (~4 h on 2 cores; goes on where it stopped, see bench/results-recipes.json); writes bench/results-recipes.md
	$(PY) bench/seeds.py --epochs 25 --title "recipes and accuracy levers, best val accuracy over seeds" \
		--out bench/results-recipes.md --results bench/results-recipes.json --short "RECIPE=$(RECIPE)" \
		--note "finetune, feature-extract and recipe come from the 2026-12-03 run (kept in the results file without curves); the code they ran is bit-identical to today's for runs without the levers." \
		--config "finetune=--mode finetune" --config "feature-extract=--mode feature-extract" \
		--config "recipe=--mode finetune $(RECIPE)" \
		--config "+ trivialaugment=--mode finetune $(RECIPE) --augment trivialaugment --tta flip" \
		--config "+ mixup/cutmix=--mode finetune $(RECIPE) --mixup 0.8 --cutmix 1.0 --tta flip" \
		--config "+ EMA=--mode finetune $(RECIPE) --ema 0.99 --tta flip" \
		--config "+ all=--mode finetune $(RECIPE) $(LEVERS_ALL) --tta flip" \
		--config "imbalanced: recipe=--data-dir {imbalanced} --mode finetune $(RECIPE)" \
		--config "imbalanced: + class weights=--data-dir {imbalanced} --mode finetune $(RECIPE) --class-weights auto" \
		--config "imbalanced: + balanced sampler=--data-dir {imbalanced} --mode finetune $(RECIPE) --sampler balanced"

bench-lora: install  ## LoRA (rank 8 and 16) against finetune, feature-extract and finetune with --layer-decay on hymenoptera, 25 epochs x 3 seeds (~55 min on a quiet 2-core machine; goes on where it stopped, see bench/results-lora.json); writes bench/results-lora.md
	$(PY) bench/seeds.py --epochs 25 --title "LoRA and layer-wise decay against the tutorial's scenarios, best val accuracy over seeds" \
		--out bench/results-lora.md --results bench/results-lora.json \
		--config "finetune=--mode finetune" --config "feature-extract=--mode feature-extract" \
		--config "lora r8=--mode lora" --config "lora r16=--mode lora --lora-rank 16 --lora-alpha 32" \
		--config "lora r8, lr 0.01=--mode lora --lr 0.01" \
		--config "finetune, layer decay 0.75=--mode finetune --layer-decay 0.75"

bench-levers: install  ## what EMA, mixup/cutmix and the augmentation policies cost, measured in one run (~15 min on 2 cores); writes bench/results-levers-cost.md
	$(PY) bench/levers.py

bench-gpu: install  ## on a GPU machine (at most ~8 min): tl vs the bare model at batch 256, tutorial vs tl, host syncs; writes bench/results-gpu.md
	$(PY) bench/gpu.py

wandb-sync: install  ## upload every offline W&B run under runs/ (needs `wandb login`)
	$(VENV)/bin/wandb sync $(wildcard runs/*/wandb/offline-run-*)

clean:
	rm -rf runs wandb .pytest_cache
