"""`neuroshield evaluate`: ASR / refusal / over-refusal / exaggerated-safety refusal with the invalid share per
language x modality, MGSM and XCOPA accuracy."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroshield.commands.common import IMAGES_HELP, split_list, split_sources, user_errors, with_images
from neuroshield.settings import EvaluateConfig, IdentifyConfig, PipelineConfig, ValidateConfig, joined

# the option defaults are the pipeline's settings (tests/test_settings.py fails when one differs); a count of 0
# there turns a part off: the contrast set and the capability tasks are then not in the defaults
EC, RUN, VC = EvaluateConfig(), PipelineConfig(), ValidateConfig()
CAPABILITY = joined([task for task in ("mgsm", "xcopa") if getattr(EC, f"{task}_per_language")]) or ""


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        model: str = typer.Option(RUN.model, "--model", "-m", help="default | smollm2 | .gguf | folder | Hub id"),
        patch: Path | None = typer.Option(None, help="Safety patch (.safetensors) to apply for the evaluation."),
        harmful: str = typer.Option(joined(IdentifyConfig().harmful[:1]), help="Harmful sets, comma-separated "
                                    "(names or files); '' for none."),
        benign: str = typer.Option(joined(EC.benign) or "", help="Benign sets for over-refusal; '' for none."),
        contrast: str = typer.Option("contrast:eval" if EC.contrast_per_language else "", help="Contrast sets (safe requests that sound dangerous) for the "
                                              "exaggerated-safety refusal, e.g. contrast:eval; '' for none."),
        capability: str = typer.Option(CAPABILITY, help="Capability tasks: mgsm, xcopa; '' for none."),
        languages: str | None = typer.Option(None, help="Languages (ISO 639-1, comma-separated); default: all of each set."),
        mgsm_languages: str | None = typer.Option(None, help="MGSM languages (default: --languages)."),
        xcopa_languages: str | None = typer.Option(joined(EC.xcopa_languages), help="XCOPA languages ('' for "
                                                   "--languages)."),
        limit: int = typer.Option(EC.harmful_per_language, help="Prompts per language and set "
                                  "(evaluate.harmful_per_language)."),
        benign_limit: int = typer.Option(EC.benign_per_language, help="Benign and contrast prompts per language "
                                         "(evaluate.benign_per_language)."),
        mgsm_limit: int | None = typer.Option(EC.mgsm_per_language or None, help="MGSM problems per language "
                                              "(default: --limit)."),
        xcopa_limit: int | None = typer.Option(EC.xcopa_per_language or None, help="XCOPA items per language "
                                               "(default: --limit)."),
        split: str = typer.Option("held-out", help="held-out (default: ids no identification or training used) | "
                                  "held-in | all: the prompt-id split, as in the pipeline (XCOPA: every id)."),
        held_out_fraction: float = typer.Option(RUN.held_out_fraction, help="Share of ids held out."),
        split_seed: int = typer.Option(RUN.seed, help="Seed of the id split and of the pick per language."),
        validation_limit: int = typer.Option(VC.per_language if VC.enabled else 0, help="Leave out the harmful ids "
                                             "`neuroshield validate` picks (this many per language, held-out), as "
                                             "the pipeline's evaluation does (validate.per_language; 0: keep them)."),
        judge: str = typer.Option(EC.judge, help="refusal-phrase | logprob | path to a classifier/guard folder."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (eval.json, eval.csv, generations cache)."),
        tag: str | None = typer.Option(None, help="Name of this evaluation in reports (default: base / patch name)."),
        batch_size: int = typer.Option(EC.batch_size, help="Prompts per batch."),
        max_new_tokens: int = typer.Option(EC.max_new_tokens, help="Tokens generated per safety prompt."),
        mgsm_max_new_tokens: int = typer.Option(256, help="Tokens generated per MGSM problem."),
        backend: str = typer.Option("hf", help="hf | vllm (vllm: checkpoints only)."),
        dtype: str | None = typer.Option(None, help="auto (default: bfloat16 where the CPU/GPU has native bf16 matmul) | float32 | bfloat16 | float16"),
        images: Path | None = typer.Option(None, "--images", help=IMAGES_HELP),
        n_resamples: int = typer.Option(1000, help="Bootstrap resamples for the 95 % intervals."),
        seed: int = typer.Option(RUN.seed, help="Bootstrap seed."),
    ) -> None:
        """Evaluate a model (optionally patched): safety per language x modality, MGSM, XCOPA."""
        import time

        from neuroshield.evaluate.evaluate import EvalSuite, evaluate
        from neuroshield.models import load_model

        with user_errors():
            start = time.perf_counter()
            langs = split_list(languages)
            sources = split_sources(harmful)
            exclude: set[str] = set()
            if validation_limit and split == "held-out":
                from neuroshield.neurons.splits import validation_pick

                exclude = {r.id for s in sources for recs in validation_pick(
                    s, langs, validation_limit, held_out_fraction=held_out_fraction, seed=split_seed).values()
                    for r in recs}
            suite = EvalSuite.from_sources(
                harmful=sources, benign=split_sources(benign), contrast=split_sources(contrast),
                capability=split_list(capability) or [], languages=langs, limit=limit,
                benign_limit=benign_limit, mgsm_limit=mgsm_limit, xcopa_limit=xcopa_limit,
                mgsm_languages=split_list(mgsm_languages), xcopa_languages=split_list(xcopa_languages),
                split=split, held_out_fraction=held_out_fraction, seed=split_seed, exclude_ids=exclude,
            )
            suite.harmful = with_images(suite.harmful, images)
            typer.echo(f"suite: {len(suite.harmful)} harmful, {len(suite.benign)} benign, {len(suite.contrast)} "
                       f"contrast, {len(suite.mgsm)} MGSM, {len(suite.xcopa)} XCOPA")
            loaded = load_model(model, dtype=dtype)
            result = evaluate(loaded, suite, patch=patch, judge=judge, out_dir=out, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, mgsm_max_new_tokens=mgsm_max_new_tokens,
                              backend=backend, tag=tag, n_resamples=n_resamples, seed=seed)
        typer.echo(f"judge: {result.judge.get('name')}@{result.judge.get('version')}   "
                   f"wall time {time.perf_counter() - start:.0f} s")
        headline = {"harmful": ("asr", "ASR"), "benign": ("over_refusal", "over-refusal"),
                    "contrast": ("exaggerated_refusal", "exag. refusal")}
        for c in result.safety:
            attr, what = headline[c.role]
            rate = getattr(c, attr)
            typer.echo(f"  {c.role:8s} {c.language:4s} {c.modality:6s} {what:13s} {rate.pct() if rate else 'n/a':>24s}  "
                       f"invalid {c.invalid.pct() if c.invalid else 'n/a':>24s}  n={c.n}")
        for c in result.capability:
            typer.echo(f"  {c.task:8s} {c.language:4s} {'':6s} {'accuracy':13s} {c.accuracy.pct():>24s}  n={c.n}")
        typer.echo(f"written: {Path(out) / 'eval.json'}")
