# catdogcnn: every target builds on one virtual environment, .venv, holding what it needs: `serve` the core and the
# [serve] extra, `predict` the core alone, every other target everything (the [all] extra).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(or $(CATDOGCNN_DATA),../shared/data/cats_vs_dogs)
PHOTOS ?= $(DATA)/test_set
NEITHER ?= $(or $(CATDOGCNN_NEITHER),../shared/data/not_pets)
PETS ?= $(or $(CATDOGCNN_PETS),../shared/data/pet_breeds)
export PYTHONUNBUFFERED := 1

.PHONY: install serve predict test engines browser postgres web docs fuzz lint bench model seed-model scratch-model clean

install: $(VENV)/.installed-all

# .installed-EXTRA: the package with that extra (`core`: none). Re-run when the dependencies change; pip itself
# is idempotent and keeps what an earlier target installed.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e "$(if $(filter core,$*),.,.[$*])"
	touch $@

## The main job: the web page and the API on http://127.0.0.1:8000 with the shipped default model.
serve: $(VENV)/.installed-serve
	$(BIN)/catdogcnn serve --host 127.0.0.1 --port 8000

## Label photos from the command line (PHOTOS=path ... to choose them).
predict: $(VENV)/.installed-core
	$(BIN)/catdogcnn predict $(PHOTOS)

test: install browser postgres web
	$(BIN)/python -m pytest -q

## Only the tests that start engines: PostgreSQL, Ray, torchrun across two nodes, several server processes.
engines: install postgres
	$(BIN)/python -m pytest -q -m slow

## Headless Chromium for the end-to-end page tests (Debian packages); the tests skip, saying so, without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
		echo "could not install chromium: the browser tests will be skipped"; }

## The page's in-browser runtime: onnxruntime-web from npm, at the version and integrity web/package-lock.json
## pins, copied into the package's static files (outside git; the wheel carries them). Without npm the page's local
## mode is unavailable and its tests skip, saying so.
ORT_FILES := ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm
web: src/catdogcnn/static/ort/.installed

src/catdogcnn/static/ort/.installed: web/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: the page's local mode will be unavailable"; exit 0; }; \
		cd web && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error && mkdir -p ../src/catdogcnn/static/ort && \
		cp $(addprefix node_modules/onnxruntime-web/dist/,$(ORT_FILES)) ../src/catdogcnn/static/ort/ && \
		touch ../src/catdogcnn/static/ort/.installed

## PostgreSQL's programs for the shared-study test, which starts a server of its own in a temporary folder
## (Debian package; told not to create the system's cluster, so no service starts); the test skips without them.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
		{ test -e /etc/postgresql-common/createcluster.conf || { mkdir -p /etc/postgresql-common && \
			echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; }; } 2>/dev/null; \
		apt-get install -y -q postgresql >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; } || \
		echo "could not install postgresql: the shared-study test will be skipped"; }

## docs/cli.md, from the command line's own help (a test checks that it matches).
docs: $(VENV)/.installed-core
	$(BIN)/typer catdogcnn.cli utils docs --name catdogcnn --title "Command reference" --output docs/cli.md

fuzz: install
	CATDOGCNN_FUZZ_EXAMPLES=$${CATDOGCNN_FUZZ_EXAMPLES:-20000} $(BIN)/python -m pytest -q tests/test_fuzz.py

lint: install
	$(BIN)/ruff check .

## Every benchmark, one after the other (about 75 minutes on 2 cores); each prints a markdown table.
bench: install
	$(BIN)/python benchmarks/seed_cnn.py --data $(DATA) --seeds 0 1 2
	$(BIN)/python benchmarks/seed_cnn_step.py
	$(BIN)/python benchmarks/augmentation.py --data $(DATA)
	$(BIN)/python benchmarks/from_scratch.py --data $(DATA)
	$(BIN)/python benchmarks/accuracy.py --data $(DATA) --not-pets $(NEITHER) --write docs/results.md
	$(BIN)/python benchmarks/other_collections.py --write docs/results.md
	$(BIN)/python benchmarks/inference.py --data $(DATA) --memory --write docs/results.md
	$(BIN)/python benchmarks/serve_load.py --data $(DATA)
	$(BIN)/python benchmarks/serve_soak.py --data $(DATA) --minutes 10 --write docs/results.md
	$(BIN)/python benchmarks/ray_predict.py --data $(DATA) --write docs/results.md
	$(BIN)/python benchmarks/ddp.py --data $(DATA)
	$(BIN)/python benchmarks/install_size.py --extras serve report data --write docs/results.md

## Retrain the shipped models from $(DATA) with fixed seeds (a rerun starts its run folder again).
seed-model: install
	$(BIN)/catdogcnn train $(DATA) --model seed_cnn --out runs/seed_cnn --overwrite --seed 0 \
		--bundle models/seed_cnn

scratch-model: install
	$(BIN)/catdogcnn train $(DATA) --config configs/resnet_small.json --neither-photos $(NEITHER) \
		--pet-photos $(PETS) --out runs/resnet_small --overwrite --seed 0 --bundle models/resnet_small

## The default: EfficientNet-Lite2 at 280 px, its last 3 blocks and head fine-tuned on the cached output of the
## frozen ones (the photo, its mirror image and 2 random resized crops of it), on training_set and the half of
## extra_set that does not validate (13,000 photos) and the pets of many breeds of $(PETS), its ImageNet head
## distilled from the frozen network's, and a "neither" rule learned from $(NEITHER) (photos with no cat or dog)
## and what the ImageNet head sees; no mirror averaging. 41 minutes on 2 cores, quantization included. The
## float graph stays in runs/default/bundle; the shipped one is its int8 copy (1.7x the photos a second on 2
## cores, a quarter the size).
model: install
	$(BIN)/catdogcnn train $(DATA) --model efficientnet_lite2 --recipe finetune --neither-photos $(NEITHER) \
		--pet-photos $(PETS) --distill 1 --image-size 280 --train-blocks 3 --epochs 8 --augment crop \
		--augment-views 2 --extra train --batch-size 64 \
		--optimizer adamw --lr 1e-3 --backbone-lr-scale 0.1 --weight-decay 1e-4 --schedule cosine --warmup-epochs 0.3 \
		--tta off --out runs/default --overwrite --seed 0
	$(BIN)/catdogcnn quantize runs/default/bundle $(DATA) --out models/default

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
