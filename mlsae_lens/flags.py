"""Flag types and checks of the ``mlsae-lens`` command line, all run before anything loads.

argparse ``type=`` functions refuse out-of-range values with the flag's name (argparse adds
it) and the accepted range; :class:`ArgumentParser` prints argparse's own errors as one line,
like every other error of the command. Nothing here imports torch at import time.
"""

import argparse
import math
import typing
from collections.abc import Callable
from pathlib import Path

from mlsae_lens.config import MultiLayerRunnerConfig, check_device
from mlsae_lens.errors import MLSAEError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other error of the command."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def output_flags(dest: str) -> tuple[str, str]:
    """``--output`` and ``--output-dir`` are accepted everywhere, the usual spelling first."""
    return ("--output-dir", "--output") if dest == "output_dir" else ("--output", "--output-dir")


def int_with_underscores(text: str) -> int:
    """Accept ``10_000_000`` and ``1e6`` as well as ``1000``."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer (``10_000``, ``1e6``) in ``[low, high]``."""

    def parse(text: str) -> int:
        value = int_with_underscores(text)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else ("positive" if low == 1 else f"at least {low}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = bounded_int(1)
nonnegative_int = bounded_int(0)
port_number = bounded_int(1, 65535)


def bounded_float(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval (NaN and inf never pass)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be in {left}{low}, {high}{right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def layer_list(text: str) -> str:
    """``all`` or distinct non-negative layer indices like ``0,5,10`` (checked against the
    model's layer count once it is known)."""
    if text.strip().lower() == "all":
        return "all"
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"must be 'all' or distinct layer indices >= 0 like 0,5,10; got {text!r}")
    values = [int(part) for part in parts]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"names a layer twice ({text!r}); list each layer once")
    return ",".join(map(str, values))


def device_flag(text: str) -> str:
    """``--device`` of the subcommands without a run config: refused by torch's own parsing
    (``tpu``, ``cuda:x``) or when CUDA is asked for and absent."""
    try:
        check_device(text)
    except MLSAEError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None  # argparse names the flag
    return text


def html_file(text: str) -> str:
    """An output file, not a directory (writing onto a directory fails only at the end)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file like report.html")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name a file in it, e.g. {Path(text) / 'page.html'}")
    return text


def nonempty_path(text: str) -> str:
    """An output path: '' would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; name a directory")
    return text


def nonempty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass some text")
    return text


def check_model_sizes(cfg: MultiLayerRunnerConfig) -> None:
    """``k < d_sae``, ``context_size <= n_ctx`` and an SAE that fits in memory, before the model
    loads, where the model's sizes are known without loading it (the embedded model's GGUF
    header, a local directory's config.json); otherwise the SAE config checks ``k`` after the
    load."""
    from mlsae_lens.models import model_sizes_without_loading

    try:
        sizes = model_sizes_without_loading(cfg.model_name)
    except (OSError, ValueError, KeyError, IndexError):  # unreadable: the load itself says so
        sizes = None
    if sizes is None:
        return
    d_model, n_ctx = sizes
    d_sae = cfg.expansion_factor * d_model
    if cfg.k >= d_sae:
        raise MLSAEError(f"--k {cfg.k} must be below the SAE's {d_sae} latents (--expansion-factor "
                         f"{cfg.expansion_factor} x d_model {d_model}); lower --k or raise --expansion-factor")
    if cfg.context_size > n_ctx:
        raise MLSAEError(f"--context-size {cfg.context_size} is longer than the model's {n_ctx} positions; "
                         f"use at most {n_ctx}")
    # W_enc and W_dec, each with its gradient and two Adam moments, in float32: a lower bound of
    # what training holds, so a hopeless --expansion-factor fails now instead of at the allocation.
    from mlsae_lens.memory import available_memory_bytes
    from mlsae_lens.sources import resolve_device

    device = resolve_device(cfg.device)
    need, free = 2 * d_model * d_sae * 4 * 4, available_memory_bytes(device)
    if need > free:
        raise MLSAEError(f"--expansion-factor {cfg.expansion_factor} makes {d_sae} latents, whose weights, gradients "
                         f"and Adam state need {need / 1e9:.1f} GB but {device} has {free / 1e9:.1f} GB free; "
                         "lower --expansion-factor")


def check_run_before_loading(cfg: MultiLayerRunnerConfig) -> None:
    """What train, demo and cache can check of their config before the model loads: the device
    is there, the sizes fit the model (where known), an activation cache matches the run."""
    check_device(cfg.device)
    check_model_sizes(cfg)
    if cfg.activation_cache is not None:
        from mlsae_lens.activation_cache import check_cache_before_loading

        check_cache_before_loading(cfg)
