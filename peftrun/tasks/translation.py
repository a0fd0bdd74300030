"""Machine translation: IWSLT 2017 for a language pair, scored by sacrebleu's corpus BLEU."""

from __future__ import annotations

from peftrun.errors import ConfigError
from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import corpus_bleu

LANGUAGES = {"ar": "Arabic", "de": "German", "en": "English", "fr": "French", "it": "Italian",
             "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "ro": "Romanian", "zh": "Chinese"}


class Iwslt2017Task(HubTask):
    """IWSLT/iwslt2017 (config iwslt2017-SRC-TGT): translation {SRC: ..., TGT: ...}.
    The pair comes from task.source_lang / task.target_lang (the Hub config follows them)."""

    name = "iwslt2017"
    primary_metric = "bleu"
    schema = ("translation",)

    def __init__(self, cfg):
        super().__init__(cfg)
        for key in ("source_lang", "target_lang"):
            code = getattr(cfg, key)
            if code not in LANGUAGES:
                raise ConfigError(f"task.{key}", f"is {code!r}; use one of {', '.join(LANGUAGES)}")
        if cfg.source_lang == cfg.target_lang:
            raise ConfigError("task.target_lang", f"equals task.source_lang ({cfg.source_lang}); "
                                                  f"pick another language")
        self.source, self.target = cfg.source_lang, cfg.target_lang

    def fields(self, record):
        pair = record["translation"]
        return {"source": pair[self.source], "target": pair[self.target],
                "source_language": LANGUAGES[self.source],
                "target_language": LANGUAGES[self.target]}

    def metrics(self, predictions, references):
        return {"bleu": corpus_bleu(predictions, references)}
