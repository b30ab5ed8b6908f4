"""`neuroshield train` (neuron-only training, LoRA and full baselines) and `neuroshield patch apply|revert|info`."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroshield.commands.common import IMAGES_HELP, print_json, split_list, split_sources, user_errors, with_images
from neuroshield.settings import BENIGN_CACHE, IdentifyConfig, PipelineConfig, TrainConfig, TrainOptions, joined

# the option defaults are the pipeline's settings (tests/test_settings.py fails when one differs)
TC, TO, RUN = TrainConfig(), TrainOptions(), PipelineConfig()


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str = typer.Option(RUN.model, "--model", help="default | smollm2 | .gguf | local folder | Hub id"),
        recipe: str = typer.Option(..., "--recipe", help="precise-shield | ss-expansion | random | lora | full"),
        set_path: str = typer.Option(None, "--set", help="Neuron set file, or a folder of ms_<lang> sets "
                                     "(needed by precise-shield, ss-expansion, random)."),
        set_languages: str = typer.Option(joined(TC.set_languages), help="precise-shield: languages whose sets to unite "
                                          "(default: every ms_<lang> in the --set folder)."),
        modalities: str = typer.Option("text", help="precise-shield: modalities whose sets to unite (text,image)."),
        like: str = typer.Option(TC.random_of[0], help="random: the recipe whose set the control copies "
                                 "(train.random_of: the pipeline trains controls of each of a list)."),
        high_resource: str = typer.Option(RUN.high_resource[0], help="ss-expansion: the high-resource language."),
        budget: float = typer.Option(TC.budget, help="precise-shield: parameter budget as a fraction of all."),
        trim: str = typer.Option(TC.trim, help="How --budget trims the set (precise-shield, and the random "
                                 "control copying it): layer (each layer keeps its share) | score (best scores overall)."),
        languages: str = typer.Option(joined(TC.languages), help="Languages of the harmful training prompts "
                                      "(comma-separated)."),
        # train.harmful [] means identify's first harmful source
        harmful: str = typer.Option(joined(TC.harmful) or IdentifyConfig().harmful[0],
                                    help="Harmful prompts: data set names or files, comma-separated."),
        harmful_split: str = typer.Option("held-in", help="held-in | held-out | all (split by prompt id)."),
        held_out_fraction: float = typer.Option(RUN.held_out_fraction, help="Share of prompt ids held out for "
                                                "evaluation."),
        split_seed: int = typer.Option(RUN.seed, help="Seed of the held-in/held-out split."),
        refusals: str = typer.Option(TC.refusals, help="language (each language picks its own ids) | parallel (the "
                                     "same ids in every one of --languages, a refusal in each language)."),
        harmful_limit: int = typer.Option(TC.per_language, help="At most this many harmful prompts per language "
                                          "and source (train.per_language)."),
        use_references: bool = typer.Option(TO.use_references, help="Harmful records with a reference refusal use it."),
        benign: str = typer.Option(joined(TC.benign) or "", help="Benign prompts: data set names or files, "
                                   "comma-separated ('' for none)."),
        benign_split: str = typer.Option("held-in", help="held-in | held-out | all: the benign prompts' id split "
                                         "(the pipeline trains on held-in ids)."),
        benign_languages: str = typer.Option(joined(TC.benign_languages), help="Languages of the benign prompts "
                                             "(comma-separated; '' for all)."),
        benign_limit: int = typer.Option(TC.benign_count, help="At most this many benign prompts per language and "
                                         "source (train.benign_count)."),
        benign_answers: str = typer.Option(TC.benign_answers, help="self (base model's answers, cached) | reference."),
        benign_cache: str = typer.Option(None, help="JSONL cache of the base model's answers "
                                         f"(default: <out>/../{BENIGN_CACHE}, shared by recipes)."),
        benign_max_new_tokens: int = typer.Option(TC.benign_max_new_tokens, help="Length of the base model's "
                                                  "benign answers."),
        benign_fraction: float = typer.Option(TC.benign_fraction, help="Share of benign examples in every batch."),
        steps: int = typer.Option(TC.steps, help="Optimizer steps."),
        lr: float = typer.Option(TO.lr, help="Learning rate (default per recipe: train.lr for the neuron recipes, "
                                 "see docs/training.md)."),
        batch_size: int = typer.Option(TC.batch_size, help="Examples per micro-batch and process."),
        grad_accum: int = typer.Option(TC.grad_accum, help="Micro-batches per optimizer step."),
        max_length: int = typer.Option(TC.max_length, help="Tokens per example (prompt + response)."),
        seed: int = typer.Option(RUN.seed, help="Seed of the data order and of the random control."),
        weight_decay: float = typer.Option(TO.weight_decay, help="AdamW weight decay (on the trainable tensors only)."),
        max_grad_norm: float = typer.Option(TO.max_grad_norm, help="Gradient clipping (0: off)."),
        warmup_steps: int = typer.Option(TC.warmup_steps, help="Linear warm-up steps."),
        parts: str = typer.Option(TC.neuron_parts, help="Neuron recipes: all (gate/up rows and down column of each FFN "
                                  "neuron) | output (the down column only: the neuron fires as before)."),
        lora_r: int = typer.Option(TO.lora_r, help="LoRA rank."),
        lora_alpha: int = typer.Option(TO.lora_alpha, help="LoRA alpha."),
        dtype: str = typer.Option(None, help="auto (default: bfloat16 where the CPU/GPU has native bf16 matmul) | float32 | bfloat16 | float16"),
        images: Path | None = typer.Option(None, "--images", help=IMAGES_HELP),
        mixed_precision: str = typer.Option(TO.mixed_precision, help="accelerate mixed precision: no | bf16 | fp16"),
        gradient_checkpointing: bool = typer.Option(TO.gradient_checkpointing, help="Recompute activations (less memory)."),
        out: Path = typer.Option(..., "--out", help="Run folder of this training."),
        checkpoint_every: int = typer.Option(TO.checkpoint_every, help="Write a checkpoint every N steps."),
        resume: bool = typer.Option(TO.resume, "--resume/--no-resume", help="Resume from the latest checkpoint."),
        export: bool = typer.Option(TO.export, "--export/--no-export", help="Write the merged checkpoint to <out>/model."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Train only the safety neurons (or a LoRA / full baseline); write checkpoint, patch and summary."""
        from neuroshield.models import load_model
        from neuroshield.neurons.splits import pick_prompts
        from neuroshield.train.recipes import NEURON_RECIPES, RECIPES, recipe_neuron_set
        from neuroshield.train.trainer import train

        with user_errors():
            if recipe not in RECIPES:
                raise ValueError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
            if recipe in NEURON_RECIPES and not set_path:
                raise ValueError(f"--recipe {recipe} needs --set (a neuron set file or a folder of ms_<lang> sets)")
            langs = split_list(languages)
            settings = TrainConfig(
                set_languages=split_list(set_languages) or [], languages=langs or [], per_language=harmful_limit,
                harmful=split_sources(harmful), benign=split_sources(benign), refusals=refusals, random_of=[like],
                benign_languages=split_list(benign_languages) or [], benign_count=benign_limit,
                benign_fraction=benign_fraction, benign_answers=benign_answers,
                benign_max_new_tokens=benign_max_new_tokens, steps=steps, warmup_steps=warmup_steps,
                batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, budget=budget, trim=trim,
                neuron_parts=parts)
            options = TrainOptions(
                lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, use_references=use_references,
                lora_r=lora_r, lora_alpha=lora_alpha, checkpoint_every=checkpoint_every, resume=resume, export=export,
                gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
                benign_cache=str(Path(benign_cache) if benign_cache else out.parent / BENIGN_CACHE))
            loaded = load_model(model, dtype=dtype)

            def pick(sources: list[str], label: str, languages: list[str] | None, split: str, limit: int) -> list:
                # the limit per source and language, as the pipeline's
                return [r for source in sources for r in pick_prompts(source, label, languages, split, limit,
                                                                      held_out_fraction=held_out_fraction,
                                                                      seed=split_seed)]

            if refusals == "parallel":
                from neuroshield.neurons.splits import parallel_pick

                harm = [r for source in settings.harmful
                        for r in parallel_pick(source, "harmful", langs or [], harmful_split, harmful_limit,
                                               held_out_fraction=held_out_fraction, seed=split_seed)]
                harm = with_images(harm, images)
            elif refusals == "language":
                harm = with_images(pick(settings.harmful, "harmful", langs, harmful_split, harmful_limit), images)
            else:
                raise ValueError(f"--refusals {refusals!r}: give language or parallel")
            ben = pick(settings.benign, "benign", split_list(benign_languages), benign_split, benign_limit)
            ns = None
            if recipe in NEURON_RECIPES:
                ns = recipe_neuron_set(recipe, loaded, set_path, set_languages=settings.set_languages,
                                       modalities=split_list(modalities) or ["text"], high_resource=high_resource,
                                       budget=budget, like=like, seed=seed, trim=trim)
            result = train(loaded, recipe, settings, harmful=harm, benign=ben, out_dir=out, neuron_set=ns, seed=seed,
                           options=options)
        summary = result.to_dict()
        summary.pop("losses", None)
        if as_json:
            print_json(summary)
            return
        typer.echo(f"recipe        {result.recipe}  ({result.neurons or '-'} neurons)  steps {result.steps_done}")
        typer.echo(f"updated       {result.parameters_updated:,} of {result.total_parameters:,} parameters "
                   f"({100 * result.fraction_updated:.4f} %), trainable tensors {result.trainable_parameters:,}")
        typer.echo(f"loss          {result.losses[0]['loss'] if result.losses else float('nan'):.4f} -> "
                   f"{result.final_loss if result.final_loss is not None else float('nan'):.4f}")
        typer.echo(f"time          {result.wall_seconds:.1f} s ({result.seconds_per_step:.2f} s/step)")
        typer.echo(f"memory        peak RSS {result.peak_rss_train_mb or result.peak_rss_mb:,.0f} MB while training "
                   f"(model loaded: {result.rss_before_mb or float('nan'):,.0f} MB)" +
                   (f", CUDA max allocated {result.peak_cuda_mb:,.0f} MB" if result.peak_cuda_mb is not None else ""))
        if result.patch:
            typer.echo(f"patch         {result.patch}")
        if result.model_dir:
            typer.echo(f"model         {result.model_dir}")
        typer.echo(f"summary       {Path(result.out_dir) / 'summary.json'}")

    _register_patch(app)


def _register_patch(app: typer.Typer) -> None:
    """`neuroshield patch apply|revert|info`."""
    patch = typer.Typer(help="Safety patches: apply, revert, inspect.", no_args_is_help=True)
    app.add_typer(patch, name="patch")

    def _apply_or_revert(action: str, model: str, patch_path: Path, out: Path, dtype: str | None) -> None:
        from neuroshield.io import atomic_dir
        from neuroshield.models import load_model
        from neuroshield.train.patch import apply_patch, revert_patch

        with user_errors():
            if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / "config.json").is_file()):
                raise ValueError(f"--out {out}: exists and is not a model folder; give a new or empty folder (a model "
                                 "folder there is replaced)")
            loaded = load_model(model, dtype=dtype)
            meta = (apply_patch if action == "apply" else revert_patch)(loaded, patch_path)
            with atomic_dir(out) as tmp:  # the folder appears complete or not at all (a full disk leaves nothing)
                loaded.model.save_pretrained(str(tmp), safe_serialization=True)
                loaded.tokenizer.save_pretrained(str(tmp))
        typer.echo(f"{action}: {meta.get('parameters_touched', 0):,} parameters ({meta.get('recipe', '?')}) "
                   f"-> {out}")

    @patch.command("apply")
    def apply_cmd(
        model: str = typer.Option(..., "--model", help="The base model the patch was made for."),
        patch_path: Path = typer.Option(..., "--patch", help="safety_patch.safetensors"),
        out: Path = typer.Option(..., "--out", help="Folder for the patched model."),
        dtype: str = typer.Option("stored", help="stored (the checkpoint's own dtype, default) | auto | float32 | "
                                                 "bfloat16 | float16"),
    ) -> None:
        """Write the patch into the base model and save the patched model."""
        _apply_or_revert("apply", model, patch_path, out, dtype)

    @patch.command("revert")
    def revert_cmd(
        model: str = typer.Option(..., "--model", help="A patched model."),
        patch_path: Path = typer.Option(..., "--patch", help="The patch it holds."),
        out: Path = typer.Option(..., "--out", help="Folder for the restored base model."),
        dtype: str = typer.Option("stored", help="stored (the checkpoint's own dtype, default) | auto | float32 | "
                                                 "bfloat16 | float16"),
    ) -> None:
        """Restore the base weights bit-exactly and save the model."""
        _apply_or_revert("revert", model, patch_path, out, dtype)

    @patch.command("info")
    def info_cmd(
        patch_path: Path = typer.Argument(..., help="safety_patch.safetensors"),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Size on disk, parameters touched, per-layer counts."""
        from neuroshield.train.patch import patch_info

        with user_errors():
            info = patch_info(patch_path)
        if as_json:
            print_json(info)
            return
        typer.echo(f"patch       {info['path']}  ({info['size_bytes'] / 1024:,.1f} KiB)")
        typer.echo(f"model       {info.get('model_id')}  config_hash={info.get('config_hash')}")
        typer.echo(f"recipe      {info.get('recipe')}  set={info.get('neuron_set')}  neurons={info.get('neurons')}")
        typer.echo(f"parameters  {info['parameters_touched']:,} touched in {info['matrices']} matrices "
                   f"({info['parameters_changed']:,} changed)")
        typer.echo("layer  parameters")
        for layer, n in info["by_layer"].items():
            typer.echo(f"{layer:>5}  {n:>10,}")
