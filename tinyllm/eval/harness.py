"""tinyllm inside lm-evaluation-harness: a model class, no export needed.

    pip install -e '.[eval]'
    python -m tinyllm.evaluate ckpt=PATH harness_tasks='[hellaswag,arc_easy]'
    python -m tinyllm.evaluate ckpt=PATH harness_tasks='[examples/tasks/agreement.jsonl]'

A `.jsonl` entry is one of our task files, turned into a harness task (YAML written to a
temporary folder: `context` -> doc_to_text, `choices` -> doc_to_choice, `label` ->
doc_to_target, no target delimiter), so both tools score the same requests.

From Python, importing this module registers the class under the name "tinyllm":

    import lm_eval, tinyllm.eval.harness
    lm_eval.simple_evaluate(model="tinyllm", model_args="ckpt=PATH", tasks=[...])

The `lm_eval` command itself has no plugin mechanism for outside model classes (its model
names are a fixed table), so `lm_eval --model tinyllm` does not work; the two ways above do.

Every request goes through tinyllm.eval.scoring.Scorer: the harness's loglikelihood with the
harness's own tokenisation (`_encode_pair`), loglikelihood_rolling with its rolling windows,
generate_until with greedy decoding (tinyllm.sampling).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tinyllm.errors import TinyLLMError

try:
    import lm_eval.models  # noqa: F401 (the harness's own model table, before ours joins it)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise TinyLLMError(
        f"lm-evaluation-harness is not installed ({e}). Install the extra: "
        "pip install -e '.[eval]' (or pip install lm-eval)."
    ) from None

from tinyllm.eval.scoring import Scorer, load


@register_model("tinyllm")
class TinyLLMLM(TemplateLM):
    """A tinyllm checkpoint (or a model + tokenizer in memory) as a harness model."""

    def __init__(
        self,
        ckpt: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 16,
        device: str | None = "auto",
        dtype: str = "fp32",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if model is None:
            model, tokenizer, _ = load(ckpt, device or "auto", dtype)
        elif tokenizer is None:
            raise TinyLLMError("TinyLLMLM(model=...) needs tokenizer= too.")
        if batch_size in (None, "auto"):  # simple_evaluate passes None when not given
            batch_size = 16
        self.scorer = Scorer(model, tokenizer, batch_size=int(batch_size))
        self.model, self.tokenizer = model, tokenizer
        self._device = self.scorer.device

    # -- what TemplateLM needs ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eot = self.scorer.prefix_id
        if eot is None:
            raise TinyLLMError("This checkpoint's tokenizer has neither BOS nor EOS.")
        return eot

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kw: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kw: Any):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        out = self.scorer.loglikelihood(pairs)
        for (key, _, _), r in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The harness's own rolling windows (full context for the last window), scored as
        loglikelihood pairs."""
        out = []
        for (string,) in [r.args for r in requests]:
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            total = sum(ll for ll, _ in self.scorer.loglikelihood(list(windows)))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's `until` strings."""
        from tinyllm.sampling import generate

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = generate(
                self.model,
                self.tokenizer,
                context,
                max_new_tokens=int(gen_kwargs.get("max_gen_toks", 256)),
                temperature=0.0,
                stop=until,
            )
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


# ------------------------------------------------------------------ tasks from our files

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task_yaml(jsonl: str | Path, folder: str | Path, name: str | None = None) -> str:
    """A harness task reading one of our JSONL task files; returns the task's name."""
    jsonl = Path(jsonl).resolve()
    if not jsonl.is_file():
        raise TinyLLMError(f"harness task file {jsonl} does not exist.")
    name = name or f"tinyllm_{jsonl.stem}"
    Path(folder, f"{name}.yaml").write_text(TASK_YAML.format(name=name, path=jsonl))
    return name


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    include: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """simple_evaluate with our model class -> {"results", "per_item": {task: [[ll, ...]]}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="tinyllm-harness-") as tmp:
        names = [write_task_yaml(t, tmp) if t.endswith(".jsonl") else t for t in tasks]
        paths = [tmp] + ([str(include)] if include else [])
        manager = TaskManager(include_path=paths)
        lm = TinyLLMLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=True
            )
        except KeyError as e:
            raise TinyLLMError(
                f"lm-evaluation-harness does not know the task {e}. Check the name "
                "(lm_eval ls tasks), or pass a .jsonl task file / harness_include=DIR."
            ) from None
    per_item = {
        task: [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(samples, key=_doc_id)]
        for task, samples in res.get("samples", {}).items()
    }
    return {"results": res["results"], "per_item": per_item, "tasks": names}


def _doc_id(sample: dict[str, Any]) -> int:
    return int(sample["doc_id"])
