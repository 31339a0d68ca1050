"""The ``%%finetune`` cell magic (``%load_ext nbtune``).

Parses the line and the cell body, then calls :func:`nbtune.ui.api.finetune`, the same function
behind ``nbtune.finetune(...)`` and ``nbtune finetune run.yaml``. Errors the user can fix (a bad
config, unusable data, a run that will not fit, ran out of GPU memory or stayed NaN/inf) are
raised as IPython ``UsageError``s with the message alone; the original exception is their
``__cause__``.
"""
from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, kwds, magic_arguments, parse_argstring

from ..train.config import ConfigError, build_config, config_reference
from .fixable import is_fixable
from .overrides import apply_overrides

DEFAULT_VAR = "finetune_result"
EXAMPLE = """\
Fine-tune with the config in the cell body (YAML; the same schema as `nbtune finetune run.yaml`
and `nbtune.finetune(...)`):

    %%finetune --out run1
    model: smollm2-135m-instruct        # embedded name, local checkpoint dir or hub id
    data: {source: gsm8k, max_rows: 512}
    lora: {r: 16, alpha: 16}
    train: {max_steps: 60, batch_size: 2, grad_accum: 4, lr: 2e-4}
    output: {dir: outputs/run1}

Then `run1.chat()("hi")`, `run1.generate("...")`, `run1.save_merged()`, `run1.adapter_dir`.
With the config in a .yaml file or a variable, use the line form: `%finetune run.yaml --out run1`
or `%finetune cfg --resume` (IPython refuses a `%%` cell whose body is empty).
`{name}` in the magic's line is replaced by the Python value of `name`
(`%%finetune --set train.lr={lr} --out {var}`). Interrupting the kernel stops after the current
step and saves a checkpoint; `--resume` continues from it. A model already loaded by an earlier
run in this kernel is reused when the config names the same one.
`--gpus N` trains the same config data-parallel on N GPUs (one process per GPU, started by
accelerate's notebook_launcher; the dashboard shows rank 0's metrics). It forks the kernel, so run
it in a fresh kernel, before any cell touches the GPU or runs a single-GPU fine-tune.
"""


@magics_class
class FinetuneMagics(Magics):
    @line_cell_magic
    @magic_arguments()
    @kwds(epilog=EXAMPLE + "\nConfig keys (section: key: type = default):\n\n" + config_reference())
    @argument("config", nargs="?", default=None,
              help="a .yaml file or the name of a variable holding a config (Config, dict or YAML text); "
                   "the cell body, if any, overrides it section by section")
    @argument("--plan", action="store_true", help="show the memory plan only (nothing is loaded)")
    @argument("--dry-run", action="store_true",
              help="check config, plan, tokenizer and data (rows, tokens, steps) without loading the model")
    @argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
    @argument("--force", action="store_true", help="train even if the planner predicts it will not fit")
    @argument("--overwrite", action="store_true",
              help="replace a previous run in output.dir (output.overwrite: true; only nbtune's files are deleted)")
    @argument("--out", metavar="VAR", default=DEFAULT_VAR,
              help=f"variable that receives the result (default: {DEFAULT_VAR})")
    @argument("--set", action="append", metavar="SECTION.KEY=VALUE", default=None,
              help="override one config value, e.g. --set train.lr=1e-4 (repeatable)")
    @argument("--gpu", default=None, help="GPU to plan for (default: this one, or T4 without a GPU)")
    @argument("--widget", action="store_true", help="live FigureWidget dashboard instead of the HTML one")
    @argument("--no-dashboard", action="store_true", help="progress lines instead of the dashboard")
    @argument("--gpus", type=int, default=None, metavar="N",
              help="train data-parallel on N GPUs of this machine (accelerate's notebook_launcher forks the "
                   "kernel: run it before anything touches the GPU); the dashboard shows rank 0; train.batch_size "
                   "is per GPU, the global batch is batch_size x grad_accum x N")
    def finetune(self, line, cell=None):
        """Fine-tune a model with LoRA/QLoRA from a YAML config: %%finetune [--plan] [--dry-run] [--resume] [--out VAR]"""
        args = parse_argstring(self.finetune, line)
        cfg = self._config(args, cell)
        from .api import finetune

        dashboard = False if args.no_dashboard else ("widget" if args.widget else True)
        try:
            result = finetune(cfg, plan=args.plan, dry_run=args.dry_run, resume=args.resume, force=args.force,
                              gpu=args.gpu, dashboard=dashboard, gpus=args.gpus, _gpus_flag="--gpus")
        except Exception as e:
            if is_fixable(e):
                raise UsageError(f"%%finetune: {e}") from e
            raise
        if args.out:
            self.shell.user_ns[args.out] = result
        return result

    def _config(self, args, cell):
        source = None
        if args.config:
            name = args.config
            if name in self.shell.user_ns and not name.endswith((".yaml", ".yml")):
                source = self.shell.user_ns[name]
            else:
                source = name
        try:
            cfg = build_config(source)
            if cell is not None and cell.strip():
                from ..train.config import parse_yaml

                body = parse_yaml(cell)
                cfg = build_config(cfg, **body) if source is not None else build_config(body)
            cfg = apply_overrides(cfg, [*(args.set or []), *(["output.overwrite=true"] if args.overwrite else [])])
        except ConfigError as e:
            raise UsageError(f"%%finetune: {e}") from e
        return cfg


def load_ipython_extension(ipython) -> None:
    from ..quiet import apply as quiet_third_party

    quiet_third_party()  # the kernel's later runs show nbtune's lines, not third-party noise (nbtune/quiet.py)
    ipython.register_magics(FinetuneMagics)


def unload_ipython_extension(ipython) -> None:  # pragma: no cover - IPython keeps registered magics
    pass
