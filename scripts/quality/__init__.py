"""The quality benchmarks' shared parts (scripts/bench_quality.py on the small backbone pretrained
here, scripts/bench_quality_smollm2.py on SmolLM2-135M-Instruct):

* `methods`: the methods compared, their size knobs and the matching of a trainable-parameter budget;
* `runs`: a run through peftrun's own trainer (with a callback timing its evaluations), the pool
  of worker processes, the zero-shot backbone;
* `curves`: pure functions over learning curves (final, best, steps and time to a threshold);
* `report`, `plots`: the Markdown tables and one PNG per task;
* `lr`: the learning-rate sweep and the committed file of its picks (`lr_picks.json`);
* `chat_data`: the synthetic tasks written as chat conversations for an instruct model.

The bench scripts put scripts/ on sys.path and import this package as `quality`.
"""
