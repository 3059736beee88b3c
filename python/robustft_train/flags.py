"""The command-line flags of robustft-train and of its subcommands (analyze-sharpness, study).
Each flag's dest is the Config setting it fills (config.py holds the defaults and the checks)."""
from __future__ import annotations

import argparse

from .config import EMBEDDED_DEFAULTS, REAL_DATA_DEFAULTS, Config
from .methods import METHOD_HELP

PROG = "robustft-train"
SHARPNESS_COMMAND = "analyze-sharpness"
STUDY_COMMAND = "study"
SHARPNESS_EMBEDDED_METHODS = "ft,flyp"
STUDY_SHARPNESS_SAMPLES = 4
_D = Config()


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The settings the command line `argv` gives explicitly (not the defaults), by dest."""
    unset = object()
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    names = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    namespace = argparse.Namespace(**{d: None if d in appended else unset for d in names})
    values = vars(parser.parse_args(argv, namespace=namespace))
    return {k: v for k, v in values.items() if v is not unset and not (k in appended and v is None)}


def _profile(key: str) -> str:
    return f"(default {REAL_DATA_DEFAULTS[key]}, embedded {EMBEDDED_DEFAULTS[key]})"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_data_flags(g, *, training: bool = True) -> None:
    """The data flags shared by training and analyze-sharpness."""
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH",
                   help="an evaluation set sharing the training class names (image folder, or CSV with "
                   "--csv-label-key and/or captions); repeat for the ID set and each shifted set")
    g.add_argument("--zeroshot-data", action="append", default=[], metavar="NAME=PATH",
                   help="a zero-shot task the fine-tuning never sees: an image folder whose sub-folder "
                   "names are its class names; repeatable")
    g.add_argument("--id-eval", help="the --eval-data NAME that is the ID validation set (selects the "
                   "best WiSE-FT alpha; its batch is the one the sharpness uses); default: the first --eval-data")
    g.add_argument("--train-data", help="fine-tuning data: an image folder (one sub-folder per class) or a "
                   "CSV/TSV of image paths and captions as open_clip's training reads" if training else
                   "only for the class names: an image folder (its sub-folders)")
    g.add_argument("--classnames", help="a text file with one class name per line, in the sorted order of "
                   "the training sub-folders (or of the CSV labels); default: the folder names")
    g.add_argument("--templates", help="a text file with one prompt template per line containing '{}' "
                   "(or '{c}'); default: a built-in set")
    g.add_argument("--csv-img-key", default=_D.csv_img_key, help="CSV column of image paths")
    g.add_argument("--csv-caption-key", default=_D.csv_caption_key, help="CSV column of captions")
    g.add_argument("--csv-label-key", default=None, help="CSV column of class labels (name or index); "
                   "needed for classification (ft, lipsum, accuracy) on CSV data")
    g.add_argument("--csv-separator", default=_D.csv_separator, help="CSV field separator")


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (omit --train-data for the embedded default)")
    g.add_argument("--model", help="an open_clip model name (open_clip.list_models()) or the path of an "
                   "open_clip model config JSON; default: the driver's tiny embedded ViT")
    g.add_argument("--pretrained", help="a local weights file (open_clip checkpoint or state dict) for "
                   "--model; the zero-shot model. Without it the model starts from random weights")
    add_data_flags(g)


def _method_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods (hyper-parameter defaults: docs/driver.md, Methods)")
    g.add_argument("--methods", help=METHOD_HELP + f"; default: {REAL_DATA_DEFAULTS['methods']!r} on "
                   f"real data, {EMBEDDED_DEFAULTS['methods']!r} embedded")
    g.add_argument("--m2mix-alpha", type=float, default=_D.m2mix_alpha,
                   help="m^2-mix: lam ~ Beta(alpha, alpha), one draw per step")
    g.add_argument("--m2mix-weight", type=float, help="m^2-mix: weight w of the m^2 term (the paper sweeps "
                   f"0.001..0.05) {_profile('m2mix_weight')}")
    g.add_argument("--m2mix-logit-scale", type=float, default=_D.m2mix_logit_scale,
                   help="m^2-mix: logit scale of the m^2 term (paper: 1/0.07)")
    g.add_argument("--dive-lambda", type=float, help=f"DiVE: weight of AVL + PVL {_profile('dive_lambda')}")
    g.add_argument("--dive-momentum", type=float, default=_D.dive_momentum,
                   help="DiVE: EMA momentum of the difference-vector centre")
    g.add_argument("--dive-ref-batch-size", type=int, default=_D.dive_ref_batch_size,
                   help="DiVE: reference pairs per step (drawn from the training data)")
    g.add_argument("--lipsum-lambda", type=float, help=f"Lipsum-FT: regulariser weight {_profile('lipsum_lambda')}")
    g.add_argument("--lipsum-num-texts", type=int, default=_D.lipsum_num_texts,
                   help="Lipsum-FT: random texts per step (K)")
    g.add_argument("--lipsum-text-length", type=int, default=_D.lipsum_text_length,
                   help="Lipsum-FT: random token ids per text (L)")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (AdamW, linear warm-up then cosine decay)")
    g.add_argument("--epochs", type=int, help=f"fine-tuning epochs {_profile('epochs')}")
    g.add_argument("--batch-size", type=int, help="batch size per process (the micro-batch under --accum-freq "
                   f"or --accum-steps) {_profile('batch_size')}")
    g.add_argument("--lr", type=float, help=f"peak learning rate {_profile('lr')}")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay {_profile('weight_decay')}")
    g.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps {_profile('warmup_steps')}")
    g.add_argument("--accum-freq", type=int, default=_D.accum_freq,
                   help="feature-cached accumulation (GradCache, open_clip's --accum-freq): K micro-batches of "
                   "--batch-size per optimiser step that together form ONE contrastive batch of batch x K x "
                   "processes, for every method and term; the same step as --batch-size batch x K, at the "
                   "memory of one micro-batch's activations plus the features of the whole batch, for a second "
                   "forward pass of each micro-batch")
    g.add_argument("--accum-steps", type=int, default=_D.accum_steps,
                   help="plain gradient accumulation: N micro-batches per optimiser step, each its OWN contrastive "
                   "batch (its negatives are its batch x processes only): the mean of N smaller batches' losses, "
                   "not the loss of one N times larger batch; one forward pass. Give --accum-freq or this, not both")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=_D.precision,
                   help="autocast precision of the forward pass (fp16 uses a gradient scaler)")
    g.add_argument("--grad-clip", type=float, default=_D.grad_clip, help="clip the gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=_D.seed, help="seed of initialisation, data order, "
                   "augmentation, prompt choice, m^2-mix's lam, Lipsum's texts, DiVE's reference pairs "
                   "and the sharpness noise")
    g = p.add_argument_group("embedded default")
    g.add_argument("--pretrain-epochs", type=int, help="epochs of the contrastive pre-training that makes "
                   f"the embedded zero-shot model (default {EMBEDDED_DEFAULTS['pretrain_epochs']})")
    g.add_argument("--embedded-fraction", type=float, default=_D.embedded_fraction,
                   help="use this fraction of the digits (smaller, faster runs; tests use it)")


def _evaluation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--wise-ft-alphas", default=_D.wise_ft_alphas,
                   help="WiSE-FT: comma-separated mixing weights of the fine-tuned model (0 = zero-shot)")
    g.add_argument("--eval-batch-size", type=int, default=_D.eval_batch_size, help="evaluation batch size")
    g.add_argument("--metric-max-images", type=int, default=_D.metric_max_images,
                   help="images per set used for uniformity and RSA (pairwise, quadratic cost)")


def add_running_flags(g, *, training: bool = True) -> None:
    g.add_argument("--device", help="cpu or cuda (default: cuda when visible, else cpu)")
    g.add_argument("--workers", type=int, default=_D.workers, help="data loader worker processes")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the embedded default, whose "
                   "tiny matrices run fastest on one thread; torch's default otherwise)")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    if not training:
        return
    g.add_argument("--measure-memory", action="store_true",
                   help="record each training phase's peak tensor memory in training.json (peak_memory_mb) on the "
                   "CPU too, where it counts every tensor an op allocates and slows training (on CUDA it is "
                   "always recorded, from the allocator)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoints (its config.json is used)")
    g.add_argument("--save-every-steps", type=int, default=_D.save_every_steps,
                   help="also checkpoint every N optimiser steps (0: only at the end of an epoch, at most once a "
                   "minute)")
    g.add_argument("--stop-after-steps", type=int, default=_D.stop_after_steps,
                   help="for testing: checkpoint and stop after N optimiser steps of a training phase, "
                   "as if the run was interrupted (0: off)")


def add_sharpness_flags(g, aliases: bool = False) -> None:
    """The sharpness settings (training: --sharpness-*; analyze-sharpness adds the short aliases
    --rho, --samples and --sparsity)."""
    def names(main: str, alias: str) -> list[str]:
        return [main, alias] if aliases else [main]

    g.add_argument(*names("--sharpness-rho", "--rho"), dest="sharpness_rho", type=float, default=_D.sharpness_rho,
                   help="adaptive perturbation radius rho: random eps ~ N(0, (rho |theta|)^2) elementwise; the "
                   "worst-case step is one ASAM ascent step of adaptive radius rho, ||eps / |theta| || = rho")
    g.add_argument(*names("--sharpness-samples", "--samples"), dest="sharpness_samples", type=int,
                   default=_D.sharpness_samples, help="noise draws per layer group and alpha for the random "
                   "sharpness (each used as +eps and -eps: 2 x this many loss evaluations)")
    g.add_argument("--sharpness-batch-size", type=int, default=_D.sharpness_batch_size,
                   help="images of the ID validation set (evenly spaced, fixed) in the batch whose "
                   "cross-entropy is perturbed")
    g.add_argument("--sharpness-stragglers", default=_D.sharpness_stragglers,
                   help="straggler rule: 'std:T' (mean z-score over alpha above mean + T std of the "
                   "groups; the top group if none) or 'topk:K'")
    g.add_argument("--sharpness-measure", choices=["random", "worst"], default=_D.sharpness_measure,
                   help="the sharpness measure that picks the straggler layers")
    g.add_argument(*names("--sharpness-sparsity", "--sparsity"), dest="sharpness_sparsity",
                   default=_D.sharpness_sparsity, help="intervention: comma-separated fractions p in [0, 1) of "
                   "the task vector zeroed (smallest |.|) inside the straggler layers")


def training_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = _parser(prog, "Fine-tune an open_clip model robustly (FT, FLYP, m^2-mix, DiVE, Lipsum-FT), evaluate "
                "in-distribution, under distribution shift and zero-shot, sweep WiSE-FT, and write a run "
                "folder with tables, checkpoints and plots. With no arguments it runs the embedded default: "
                "handwritten digits (scikit-learn) and a tiny open_clip model pre-trained on the spot, offline, "
                "in a few minutes on a CPU. Subcommands: 'robustft-train study --help' (the method comparison "
                "over seeds) and 'robustft-train analyze-sharpness --help'.")
    _model_flags(p)
    _method_flags(p)
    _optimisation_flags(p)
    _evaluation_flags(p)
    g = p.add_argument_group("running")
    g.add_argument("--run-dir", help="the run folder (default: runs/<timestamp>)")
    add_running_flags(g)
    g = p.add_argument_group("sharpness along WiSE-FT (also: robustft-train analyze-sharpness --help)")
    g.add_argument("--analyze-sharpness", action="store_true",
                   help="after each method's WiSE-FT sweep, measure overall and layer-wise sharpness at every "
                   "alpha, find the straggler layers, correlate with OOD accuracy and run the sparsity "
                   "intervention (<run-dir>/sharpness/)")
    g.add_argument("--sharpness-methods", help="the methods the sharpness analysis covers (default: every "
                   "fine-tuned method)")
    add_sharpness_flags(g)
    return p


def study_parser() -> argparse.ArgumentParser:
    p = training_parser(f"{PROG} {STUDY_COMMAND}")
    p.description = ("Run the whole method comparison once per seed (each seed a complete run folder "
                     "<run-dir>/seed-<s>/) and summarise it over the seeds: means with 95% t-intervals, "
                     "the paired difference of each method against its base, the claims of the papers with "
                     "a verdict, and plots with error bars. Takes every training flag.")
    g = p.add_argument_group("study")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each (at least 2 for an "
                   "interval); --seed is not used")
    g.add_argument("--no-sharpness", action="store_true", help="skip the sharpness analysis (the straggler claim "
                   "is then inconclusive); by default the study analyses ft and flyp (--analyze-sharpness)")
    # The straggler claim is read on the deterministic worst-case measure: at affordable sample
    # counts the random measure's Monte-Carlo noise moves its rank correlations more than the seeds
    # do (docs/sharpness.md); a few random draws are still made, for the tables.
    p.set_defaults(sharpness_measure="worst", sharpness_samples=STUDY_SHARPNESS_SAMPLES)
    return p


def sharpness_parser() -> argparse.ArgumentParser:
    p = _parser(f"{PROG} {SHARPNESS_COMMAND}",
                "Layer-wise sharpness along the WiSE-FT path (docs/sharpness.md, our reading of arXiv "
                "2410.16476): for every alpha the overall and layer-wise sharpness (random and worst-case "
                "adaptive perturbations), ID and OOD accuracy, the straggler layers, rank correlations with "
                "OOD accuracy, and the sparsity intervention. Without --zeroshot/--finetuned it analyses the "
                "run in --run-dir, or trains the embedded default.")
    g = p.add_argument_group("models")
    g.add_argument("--zeroshot", metavar="CKPT", help="the zero-shot model: a robustft-train checkpoint "
                   "(checkpoints/pretrain/final.pt) or a state dict / open_clip checkpoint")
    g.add_argument("--finetuned", action="append", default=[], metavar="[NAME=]CKPT",
                   help="a fine-tuned model (checkpoints/<method>/final.pt, or a state dict); repeatable; "
                   "NAME labels it (default: the checkpoint's method, else 'finetuned')")
    g.add_argument("--model", help="open_clip model name or config JSON (default: the tiny embedded ViT)")
    add_data_flags(p.add_argument_group("data (as for training; omit --eval-data for the embedded digits)"),
                   training=False)
    g = p.add_argument_group("sharpness")
    add_sharpness_flags(g, aliases=True)
    g.add_argument("--wise-ft-alphas", default=_D.wise_ft_alphas, help="the interpolation path")
    g = p.add_argument_group("embedded default (when it trains: no checkpoints and no run in --run-dir)")
    g.add_argument("--methods", default=SHARPNESS_EMBEDDED_METHODS, help="methods to fine-tune and analyse")
    g.add_argument("--embedded-fraction", type=float, default=_D.embedded_fraction,
                   help="fraction of the digits (also the digits sets used with --zeroshot/--finetuned)")
    g.add_argument("--pretrain-epochs", type=int, help=f"pre-training epochs (default {EMBEDDED_DEFAULTS['pretrain_epochs']})")
    g.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default {EMBEDDED_DEFAULTS['epochs']})")
    g = p.add_argument_group("running")
    g.add_argument("--run-dir", help="output folder (results under <run-dir>/sharpness/); a finished "
                   "robustft-train run there is analysed (default: runs/sharpness-<timestamp>)")
    add_running_flags(g, training=False)
    g.add_argument("--eval-batch-size", type=int, default=_D.eval_batch_size,
                   help="batch size of the accuracy evaluation along the path")
    g.add_argument("--metric-max-images", type=int, default=_D.metric_max_images,
                   help="images per set used for uniformity and RSA (pairwise, quadratic cost)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast of the accuracy evaluation (the sharpness loss always runs in fp32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise draws (and of training)")
    return p
