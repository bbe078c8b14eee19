# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install
# the package with the pinned versions in constraints.txt (CPU torch, no CUDA download).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: install test test-fast lint nbcheck demo figures clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: install
	$(PY) -m ruff check moe tests experiments benchmarks

# notebooks are committed without outputs or execution counts: this fails (exit 1) naming each one
# that has any; `$(PY) -m nbstripout notebooks/*.ipynb` strips them in place
nbcheck: install
	$(PY) -m nbstripout --verify --keep-id notebooks/*.ipynb

# the whole suite, slow tests and notebooks (executed by nbmake) included; CI runs this
test: lint nbcheck
	$(PY) -m pytest -q --nbmake tests notebooks

# the quick loop while developing
test-fast: lint nbcheck
	$(PY) -m pytest -q -m "not slow"

# about 2-3 minutes on 2 CPU cores, offline: train the toy preset plus one MTP module (the
# drafter for speculative decoding, as in DeepSeek-V3) on the embedded prose + code corpus,
# compare with a unigram baseline, print samples (plain and speculative), write plots.
# One intra-op thread: the toy's matmuls are too small to gain much from a second one, and two
# threads slow to a crawl whenever another program wants a core. DEMO_STEPS=200 for a quick look.
# Samples stay within the 128-byte training context (quality drops beyond what was trained).
DEMO_STEPS ?= 1000
DEMO_THREADS ?= 1
SAMPLE := --max-new-tokens 120 --temperature 0.8 --top-k 40 --device cpu
demo: install
	$(PY) -m moe train --preset toy --set n_mtp=1 --out $(OUT) --steps $(DEMO_STEPS) --threads $(DEMO_THREADS) --overwrite
	@echo "--- sample, prose prompt"
	@OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m moe generate $(OUT) --prompt "The " $(SAMPLE) --seed 2
	@echo "--- sample, code prompt"
	@OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m moe generate $(OUT) --prompt "    def __init__(self" $(SAMPLE) --seed 1
	@echo "--- sample, speculative decoding: the MTP module drafts, the main model verifies"
	@OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m moe generate $(OUT) --prompt "import " $(SAMPLE) --seed 3 --speculative
	@echo "demo done: run folder $(OUT) (metrics.jsonl, checkpoint); plots in $(OUT)/plots (loss.png, expert_load.png)"

# The README's figures and the numbers beside them, rebuilt from scratch: about 25 minutes on 2
# CPU cores (dense_vs_moe ~10, mtp ~14, savings and parallel seconds), one thread each, offline.
# Run folders go to FIG_OUT; the PNGs and each experiment's results.json are copied into docs/img/.
# The balancing page's figures have their own, longer command (docs/balancing.md, ~25 minutes).
FIG_OUT ?= runs/figures
figures: install
	$(PY) experiments/savings.py --out $(FIG_OUT)/savings
	$(PY) experiments/dense_vs_moe.py --out $(FIG_OUT)/dense_vs_moe
	$(PY) experiments/mtp.py --out $(FIG_OUT)/mtp
	$(PY) experiments/parallel_traffic.py --out $(FIG_OUT)/parallel
	mkdir -p docs/img
	cp $(addprefix $(FIG_OUT)/savings/,params.png memory.png kv_cache.png flops.png) docs/img/
	cp $(FIG_OUT)/savings/results.json docs/img/savings.results.json
	cp $(FIG_OUT)/dense_vs_moe/dense_vs_moe.png $(FIG_OUT)/dense_vs_moe/dense_vs_moe_time.png docs/img/
	cp $(FIG_OUT)/dense_vs_moe/results.json docs/img/dense_vs_moe.results.json
	cp $(FIG_OUT)/mtp/mtp.png docs/img/
	cp $(FIG_OUT)/mtp/results.json docs/img/mtp.results.json
	cp $(FIG_OUT)/parallel/parallel_*.png docs/img/
	@echo "figures done: docs/img/ (update the numbers quoted in README.md and docs/ from docs/img/*.results.json:"
	@echo "tests/test_readme_figures.py checks that the tables there match)"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
