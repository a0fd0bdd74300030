"""Bad input is refused before any data is tokenized or weights load: one line naming the key and
the fix, exit 2, no traceback, nothing written (issue 31, "nothing let in").

The table runs in-process through `peftrun.cli.precheck` (the check the command line runs before
Hydra creates anything), with `fail` raising the ConfigError instead of exiting, so each case
costs a composition and a validation, not a process. A handful run through a real `peftrun`
subprocess to prove the one-line / exit-2 / nothing-written path end to end. `peftrun-generate`
and `peftrun-eval` are called through their `main`, which refuses before loading any model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import call_main, run_cli
import peftrun.cli as cli
from peftrun.errors import ConfigError

# (id, command line ({tmp}: the case's folder), the key its one line must name)
BAD_INPUT = [
    # ---------------------------------------------------------------- keys the schema does not know
    ("unknown-key", ["method.nope=1"], "method.nope"),
    ("unknown-trainer-key", ["trainer.log_to=wandb"], "trainer.log_to"),
    ("plus-unknown-trainer-key", ["+trainer.log_to=wandb"], "trainer.log_to"),
    ("unknown-tracker", ["trainer.report_to=[tensorboard,nope]"], "trainer.report_to"),
    ("plus-unknown-method-key", ["+method.rank=64"], "method.rank"),
    ("plusplus-unknown-method-key", ["++method.rank=64"], "method.rank"),
    ("plusplus-unknown-task-key", ["++task.nope=1"], "task.nope"),
    ("plus-unknown-root-key", ["+report_to=wandb"], "report_to"),
    ("plus-unknown-nested-key", ["+model.build.foo=3"], "model.build.foo"),
    ("plus-key-of-another-task", ["+task.prompt_template=x"], "task.prompt_template"),
    ("plus-key-of-another-method", ["method=para", "+method.r=4"], "method.r"),
    ("unknown-option", ["method=nope"], "method"),
    ("wrong-type", ["method.r=abc"], "method.r"),
    # ---------------------------------------------------------------- numbers that are not finite
    ("alpha-nan", ["method.alpha=nan"], "method.alpha"),
    ("alpha-inf", ["method.alpha=inf"], "method.alpha"),
    ("alpha-minus-inf", ["method.alpha=-inf"], "method.alpha"),
    ("lr-inf", ["trainer.lr=inf"], "trainer.lr"),
    ("lr-nan", ["trainer.lr=nan"], "trainer.lr"),
    ("max-grad-norm-nan", ["trainer.max_grad_norm=nan"], "trainer.max_grad_norm"),
    ("rational-lr-nan", ["method=iapt", "method.rational_lr=nan"], "method.rational_lr"),
    ("epochs-nan", ["trainer.epochs=nan"], "trainer.epochs"),
    ("warmup-ratio-nan", ["trainer.warmup_ratio=nan"], "trainer.warmup_ratio"),
    ("adam-beta-nan", ["trainer.adam_betas=[0.9,nan]"], "trainer.adam_betas[1]"),
    ("adam-eps-inf", ["trainer.adam_eps=inf"], "trainer.adam_eps"),
    ("weight-decay-nan", ["trainer.weight_decay=nan"], "trainer.weight_decay"),
    ("alora-alpha-inf", ["method=alora", "method.alpha=inf"], "method.alpha"),
    ("dropout-nan", ["method.dropout=nan"], "method.dropout"),
    ("tied-lora-init-v-nan", ["method=tied_lora", "method.init_v=nan"], "method.init_v"),
    ("alora-warmup-epochs-inf", ["method=alora", "method.warmup_epochs=inf"], "method.warmup_epochs"),
    # ---------------------------------------------------------------- numbers out of range
    ("max-steps-negative", ["trainer.max_steps=-5"], "trainer.max_steps"),
    ("num-beams-zero", ["trainer.num_beams=0"], "trainer.num_beams"),
    ("adam-beta-above-one", ["trainer.adam_betas=[1.5,0.999]"], "trainer.adam_betas"),
    ("adam-beta-negative", ["trainer.adam_betas=[0.9,-0.1]"], "trainer.adam_betas"),
    ("adam-betas-one-value", ["trainer.adam_betas=[0.9]"], "trainer.adam_betas"),
    ("weight-decay-negative", ["trainer.weight_decay=-1"], "trainer.weight_decay"),
    ("lr-zero", ["trainer.lr=0"], "trainer.lr"),
    ("lr-negative", ["trainer.lr=-1e-3"], "trainer.lr"),
    ("adam-eps-zero", ["trainer.adam_eps=0"], "trainer.adam_eps"),
    ("max-grad-norm-negative", ["trainer.max_grad_norm=-1"], "trainer.max_grad_norm"),
    ("epochs-negative", ["trainer.max_steps=-1", "trainer.epochs=-1"], "trainer.epochs"),
    ("warmup-steps-negative", ["trainer.warmup_steps=-1"], "trainer.warmup_steps"),
    ("warmup-ratio-one", ["trainer.warmup_ratio=1.0"], "trainer.warmup_ratio"),
    ("eval-every-negative", ["trainer.eval_every=-1"], "trainer.eval_every"),
    ("save-every-negative", ["trainer.save_every=-3"], "trainer.save_every"),
    ("save-total-limit-negative", ["trainer.save_total_limit=-1"], "trainer.save_total_limit"),
    ("patience-negative", ["trainer.early_stopping_patience=-1"], "trainer.early_stopping_patience"),
    ("seed-negative", ["trainer.seed=-1"], "trainer.seed"),
    ("micro-batch-zero", ["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
    ("grad-accum-zero", ["trainer.grad_accum=0"], "trainer.grad_accum"),
    ("eval-batch-zero", ["trainer.eval_batch_size=0"], "trainer.eval_batch_size"),
    ("num-processes-zero", ["trainer.num_processes=0"], "trainer.num_processes"),
    ("nonfinite-skips-negative", ["trainer.max_nonfinite_skips=-1"], "trainer.max_nonfinite_skips"),
    ("max-length-beyond-positions", ["model=tiny_gpt2", "task.max_length=300"], "task.max_length"),
    ("max-length-beyond-positions-jsonl", ["model=tiny_gpt2", "task=jsonl", "task.train_file={tmp}/records.jsonl"],
     "task.max_length"),
    ("max-length-one", ["task.max_length=1"], "task.max_length"),
    ("max-new-tokens-zero", ["task.max_new_tokens=0"], "task.max_new_tokens"),
    ("rank-zero", ["method.r=0"], "method.r"),
    ("dropout-above-one", ["method.dropout=1.5"], "method.dropout"),
    ("unknown-scheduler", ["trainer.scheduler=step"], "trainer.scheduler"),
    ("unknown-strategy", ["trainer.strategy=zero3"], "trainer.strategy"),
    ("packing-not-a-bool", ["trainer.packing=maybe"], "trainer.packing"),
    ("group-by-length-not-a-bool", ["trainer.group_by_length=often"], "trainer.group_by_length"),
    # ---------------------------------------------------------------- checks moved before tokenizing
    ("batch-larger-than-data", ["trainer.micro_batch_size=4096", "task.num_train=100"], "trainer.micro_batch_size"),
    ("accumulated-batch-larger-than-data", ["trainer.grad_accum=64", "task.num_train=1000"], "trainer.micro_batch_size"),
    ("alora-warmup-past-the-run", ["method=alora", "trainer.max_steps=5"], "method.warmup_epochs"),
    ("alora-warmup-steps-past-the-run", ["method=alora", "method.warmup_steps=50", "trainer.max_steps=20"],
     "method.warmup_epochs"),
    ("unknown-attention", ["model.attn_implementation=foo"], "model.attn_implementation"),
    ("flash-attention-missing", ["model.attn_implementation=flash_attention_2"], "model.attn_implementation"),
    ("quantized-fsdp", ["model.quantization=nf4", "trainer.strategy=fsdp"], "trainer.strategy"),
    # ---------------------------------------------------------------- templates: field names only
    ("template-attribute", ["task=jsonl", "task.train_file={tmp}/records.jsonl",
                            "task.prompt_template='{prompt.__class__}'"], "task.prompt_template"),
    ("template-index", ["task=jsonl", "task.train_file={tmp}/records.jsonl",
                        "task.target_template='{target[0]}'"], "task.target_template"),
    ("template-conversion", ["task=jsonl", "task.train_file={tmp}/records.jsonl",
                             "task.prompt_template='{prompt!r}'"], "task.prompt_template"),
    ("template-format-spec", ["task=jsonl", "task.train_file={tmp}/records.jsonl",
                              "task.prompt_template='{prompt:>10}'"], "task.prompt_template"),
    ("template-positional", ["task=jsonl", "task.train_file={tmp}/records.jsonl",
                             "task.prompt_template='Q: {0}'"], "task.prompt_template"),
    ("hub-template-attribute", ["task=squad", "task.data_files={tmp}/records.jsonl",
                                "task.prompt_template='{question.upper}'"], "task.prompt_template"),
    # ---------------------------------------------------------------- the run folder
    ("run-dir-is-a-file", ["hydra.run.dir={tmp}/a_file"], "hydra.run.dir"),
    ("run-dir-under-a-file", ["hydra.run.dir={tmp}/a_file/run"], "hydra.run.dir"),
    ("sweep-dir-is-a-file", ["-m", "trainer.lr=1e-3,3e-3", "hydra.sweep.dir={tmp}/a_file"], "hydra.sweep.dir"),
]
if torch.cuda.is_available():
    BAD_INPUT = [c for c in BAD_INPUT if c[0] != "flash-attention-missing"]
else:
    BAD_INPUT.append(("fp16-without-gpu", ["trainer.precision=fp16"], "trainer.precision"))


def make_case_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text(
        "".join(json.dumps({"prompt": f"p{i}", "target": f"t{i}"}) + "\n" for i in range(8)))
    (folder / "a_file").write_text("not a folder\n")
    return folder


def argv_for(case: list[str], folder: Path) -> list[str]:
    args = [a.format(tmp=folder) if "{tmp}" in a else a for a in case]
    if not any(a.startswith("hydra.") for a in args):
        args.append(f"{'hydra.sweep.dir' if '-m' in args else 'hydra.run.dir'}={folder / 'run'}")
    return args


def _raise(err, prog="peftrun", code=None):
    raise err


def refusal(argv: list[str], monkeypatch) -> ConfigError | None:
    """The ConfigError `peftrun ARGV` is refused with before Hydra runs, or None."""
    from peftrun import validate

    monkeypatch.setattr(cli, "fail", _raise)
    try:
        cli.precheck(argv)
    except ConfigError as e:
        return e
    finally:
        validate._kept.clear()
    return None


@pytest.mark.parametrize("case_id,overrides,key", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_in_validation(case_id, overrides, key, tmp_path, monkeypatch):
    folder = make_case_folder(tmp_path / "case")
    before = sorted(p.name for p in folder.iterdir())
    err = refusal(argv_for(overrides, folder), monkeypatch)
    assert err is not None, f"{case_id}: accepted"
    assert err.key == key, f"{case_id}: {err}"
    assert err.message.strip() and "\n" not in str(err)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


def test_the_table_is_large_and_a_good_command_passes(tmp_path, monkeypatch):
    assert len(BAD_INPUT) >= 60
    folder = make_case_folder(tmp_path / "good")
    assert refusal(argv_for(["trainer.max_steps=5", "method=alora", "method.warmup_steps=2"], folder),
                   monkeypatch) is None
    assert refusal(argv_for(["task=jsonl", "task.train_file={tmp}/records.jsonl",
                             "task.prompt_template='Q: {{prompt}} {prompt}'", "trainer.micro_batch_size=2"],
                            folder), monkeypatch) is None


def test_templates_render_field_names_only():
    from peftrun.tasks.template import render_template, template_fields

    assert render_template("Q: {q}{{x}} {n}", {"q": "why", "n": 3}) == "Q: why{x} 3"
    assert template_fields("{a} and {b}", "k") == ["a", "b"]
    for bad in ("{prompt.__class__}", "{a[0]}", "{a!r}", "{a:>4}", "{}", "{0}", "{a"):
        with pytest.raises(ConfigError) as e:
            template_fields(bad, "task.prompt_template")
        assert e.value.key == "task.prompt_template"


# ---------------------------------------------------------------------------- the other tools
tool = call_main


def assert_tool_line(result, prog: str, key: str | None = None) -> str:
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: {key + ':' if key else ''}"), lines[0]
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture
def a_run(tmp_path):
    """A run folder as far as the tools read before loading weights (config.yaml, adapter config)."""
    from omegaconf import OmegaConf

    from conftest import compose_config

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(), resolve=True))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"method": "lora", "config": {"name": "lora"}}))
    (run / "predictions.jsonl").write_bytes(b'{"prompt": "max 1=", "target": "1", "prediction": "\xff\xfe"}\n')
    return run


TOOL_CASES = ["generate-non-utf8-prompts", "generate-adapter-name-with-space", "generate-adapter-name-path",
              "generate-unknown-flag", "eval-non-utf8-predictions", "eval-unknown-flag", "eval-config-not-yaml"]


@pytest.mark.parametrize("case_id", TOOL_CASES)
def test_generate_and_eval_refuse_bad_input_in_one_line(case_id, a_run, tmp_path, capsys):
    from peftrun.evaluate import main as eval_main
    from peftrun.serve import main as generate_main

    latin1 = tmp_path / "prompts.jsonl"
    latin1.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    cases = {
        "generate-non-utf8-prompts": (generate_main, [a_run, "--prompts-file", latin1], "peftrun-generate", "prompts-file"),
        "generate-adapter-name-with-space": (generate_main, [a_run, "--adapter", f"my run={a_run}", "--prompt", "x"],
                                             "peftrun-generate", "adapter"),
        "generate-adapter-name-path": (generate_main, [a_run, "--adapter", f"../b={a_run}", "--prompt", "x"],
                                       "peftrun-generate", "adapter"),
        "generate-unknown-flag": (generate_main, [a_run, "--prompt", "x", "--temperature", "0.7"], "peftrun-generate", None),
        "eval-non-utf8-predictions": (eval_main, [a_run], "peftrun-eval", "predictions"),
        "eval-unknown-flag": (eval_main, [a_run, "--bogus"], "peftrun-eval", None),
        "eval-config-not-yaml": (eval_main, [a_run / "predictions.jsonl", "--config", latin1], "peftrun-eval", "config"),
    }
    main, argv, prog, key = cases[case_id]
    if case_id == "eval-config-not-yaml":
        (a_run / "predictions.jsonl").write_text('{"prompt": "max 1=", "target": "1", "prediction": "1"}\n')
        latin1.write_bytes(b"task: [\xff\n")
    assert_tool_line(tool(main, argv, capsys), prog, key)


def test_generate_runs_no_code_a_run_folder_asks_for(a_run, tmp_path, capsys):
    """A run folder whose config.yaml says trust_remote_code: true and points the backbone at a
    folder shipping Python: nothing of it runs unless the command line says --trust-remote-code."""
    from omegaconf import OmegaConf

    from peftrun.serve import main as generate_main

    evil = tmp_path / "evil_model"
    evil.mkdir()
    marker = tmp_path / "code_ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import PretrainedConfig\n"
                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    auto = {"AutoConfig": "evil.EvilConfig", "AutoTokenizer": ["evil.EvilTokenizer", None],
            "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto}))
    (evil / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto, "tokenizer_class": "EvilTokenizer"}))
    cfg = OmegaConf.load(a_run / "config.yaml")
    cfg.model.build = None
    cfg.model.name_or_path = str(evil)
    cfg.model.trust_remote_code = True
    (a_run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    code, out, err = tool(generate_main, [a_run, "--prompt", "x"], capsys)
    assert code == 2 and "Traceback" not in out + err, err
    # (transformers may warn about the unknown model type first; the refusal is the last line)
    line = err.splitlines()[-1]
    assert line.startswith("peftrun-generate: error: trust-remote-code:") and "--trust-remote-code" in line, line
    assert not marker.exists(), "the run folder's code ran"


# ---------------------------------------------------------------------------- end to end, a few
# (tests/test_cli.py runs more of the older cases the same way)
E2E = ["plus-unknown-trainer-key", "quantized-fsdp", "run-dir-is-a-file"]


def assert_one_error_line(result, key: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"peftrun: error: {key}:"), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case_id", E2E)
def test_bad_input_end_to_end(case_id, tmp_path):
    table = {c[0]: c for c in BAD_INPUT}
    _, overrides, key = table[case_id]
    folder = make_case_folder(tmp_path / "case")
    before = sorted(p.name for p in folder.iterdir())
    result = run_cli(*argv_for(overrides, folder), "trainer.progress=false", cwd=folder)
    assert_one_error_line(result, key)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, not even the run folder
