"""`retnet generate`: continue a prompt from a checkpoint, printing the text as it is made;
save the state after the run (--state-out) or continue from a saved one (--state-in)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from retnet.device import check_device, pick_device
from retnet.generation.loop import generate_stream, prefill
from retnet.generation.text import TextStream
from retnet.loading import DTYPES, check_quantization, load_run
from retnet.model import RetNetLM, RetNetState, load_state, save_state
from retnet.model.fast_decode import decode_path
from retnet.modules.quant import QUANTIZATIONS
from retnet.options import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    check_options,
    opt,
    short,
)
from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, render_chat

MAX_SAMPLES = 256  # rows decoded together: each holds its own state and sampler


@dataclass
class GenerateOptions:
    """Options of `retnet generate`."""

    checkpoint: str = opt(help="run directory or checkpoint folder")
    prompt: str | None = opt(None, "text to continue, echoed before the new text (default: "
                             "none, the model starts a document)")
    prompt_file: str | None = opt(None, "read the prompt from FILE ('-': standard input) "
                                  "instead of --prompt; it is not echoed", metavar="FILE")
    chat: str | None = opt(None, "a user message instead of a prompt: rendered with the "
                           "checkpoint's chat template as the server renders a chat request, "
                           "and only the answer printed (it ends at <|endoftext|>)",
                           metavar="MESSAGE")
    max_new_tokens: int = opt(200, "tokens to generate; 0: only read the prompt (--state-out)",
                              bounds=NON_NEGATIVE)
    temperature: float = opt(0.8, "0 for greedy; one so small that the logits divided by it "
                             "overflow (below about 1e-38) samples greedily too",
                             bounds=NON_NEGATIVE)
    top_k: int | None = opt(None, "sample among the k most likely tokens only",
                            bounds=AT_LEAST_ONE)
    top_p: float = opt(0.95, "sample among the most likely tokens whose probabilities reach "
                       "p (1: all)", bounds=Range(0, 1, low_open=True))
    repetition_penalty: float = opt(1.0, "CTRL's penalty on tokens already seen (1: none)",
                                    bounds=POSITIVE)
    seed: int = opt(0, "seed of the sampler's random generator (sample i: seed + i)",
                    bounds=SEED)
    num_samples: int = opt(1, "continuations of the same prompt, decoded together as a batch "
                           "and printed one after another once all are done", aliases=("-n",),
                           bounds=Range(1, MAX_SAMPLES))
    stop: list[str] = opt(help="stop once the text holds this string (not printed); "
                          "several may be given", factory=list, metavar="TEXT")
    state_in: str | None = opt(None, "continue from a state saved by --state-out",
                               metavar="FILE")
    state_out: str | None = opt(None, "save the state after the run here (safetensors)",
                                metavar="FILE")
    device: str | None = opt(None, "cpu, cuda, cuda:N or mps (default: cuda if available, "
                             "else cpu)")
    dtype: str = opt("float32", "the weights' dtype", choices=tuple(DTYPES))
    quantization: str | None = opt(None, "int8: weight-only int8 with one scale per output "
                                   "channel (embedding and tied head included; float32 "
                                   "activations and state)", choices=QUANTIZATIONS)
    adapter: str | None = opt(None, "a LoRA adapter.safetensors (`retnet train --lora-save "
                              "adapter`) merged into the checkpoint's weights", metavar="FILE")

    def __post_init__(self) -> None:
        """Every value checked before anything loads: one line naming the bad option."""
        check_quantization(self.quantization, self.dtype)
        check_options(self)  # types, --dtype, and every number's range (--temperature nan)
        if self.num_samples > 1 and self.state_out:
            raise ValueError("--state-out saves one state: use it with --num-samples 1")
        given = [f for f in ("prompt", "prompt_file", "chat") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"pass one of --prompt, --prompt-file and --chat, not "
                             f"{' and '.join('--' + f.replace('_', '-') for f in given)}")
        if not (_is_text(self.prompt or "") and _is_text(self.chat or "")):
            raise ValueError("--prompt is not valid UTF-8 text")
        if not all(s and _is_text(s) for s in self.stop):
            raise ValueError(f"--stop needs non-empty UTF-8 strings; got {short(self.stop)}")
        check_device(self.device)


def command(opts: GenerateOptions) -> int:
    """Print the prompt (when given with --prompt) and its continuation as it is made."""
    _check_paths(opts)
    prompt = _read_prompt(opts.prompt_file) if opts.prompt_file else opts.prompt or ""
    loaded = load_run(opts.checkpoint, pick_device(opts.device), opts.dtype, opts.quantization,
                      layout="inference", adapter=opts.adapter)
    model, tok = loaded.model, loaded.tokenizer
    fingerprint = model.config.fingerprint()
    device = model.embed.weight.device
    state = None
    if opts.state_in:
        state = load_state(opts.state_in, fingerprint, device).to(dtype=model.state_dtype)
    ids = tok.encode(prompt) or [tok.eos_id]
    if opts.chat is not None:  # the answer only: the rendered turn is not echoed
        template = loaded.chat_template or DEFAULT_CHAT_TEMPLATE
        ids = render_chat([{"role": "user", "content": opts.chat}], tok, template)[0]
    if max(ids) >= model.config.vocab_size:
        raise ValueError("the prompt encodes to ids beyond the model's vocabulary")
    print(f"decode: {decode_path(model)}", file=sys.stderr, flush=True)
    # a file is not echoed back (#17), nor the rendered chat turn
    echo = prompt if opts.prompt_file is None and opts.chat is None else ""
    if opts.num_samples > 1:
        ids = torch.tensor([ids] * opts.num_samples, device=device)
        _samples(model, tok, ids, state, opts, echo)
        return 0
    state = _stream(model, tok, torch.tensor([ids], device=device), state, opts, echo)
    if opts.state_out:
        save_state(opts.state_out, state, fingerprint)
        print(f"state after {int(state.offset[0])} tokens saved to {opts.state_out}",
              file=sys.stderr)
    return 0


def _sampling(opts: GenerateOptions, tok: Tokenizer) -> dict:
    """generate_stream's arguments from the options (all but the ids, seed and state)."""
    return dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                top_k=opts.top_k, top_p=opts.top_p, repetition_penalty=opts.repetition_penalty,
                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, stop=opts.stop or None,
                tokenizer=tok)


def _echoed(stream: Iterator, echo: str) -> Iterator:
    """The stream, with `echo` written to stdout once the prompt has been read: the notices
    the first forward may print (on stderr, once each) then come before the text, never
    inside it on a terminal."""
    first = next(stream, None)  # None: nothing to generate (--max-new-tokens 0)
    sys.stderr.flush()
    sys.stdout.write(echo)
    if first is not None:
        yield first
        yield from stream


def _stream(model: RetNetLM, tok: Tokenizer, ids: torch.Tensor, state: RetNetState | None,
            opts: GenerateOptions, echo: str = "") -> RetNetState:
    """Generate after ids [1, T], printing `echo` and then the text as TextStream releases
    it; returns the state after every token (a stop string's tokens included)."""
    if opts.max_new_tokens == 0:  # only read the prompt: its state, for --state-out
        _, state = prefill(model, ids, state=state)
        sys.stderr.flush()
        sys.stdout.write(echo + "\n")
        return state
    stream = generate_stream(model, ids, seed=opts.seed, state=state, **_sampling(opts, tok))
    text = TextStream(tok, opts.stop)
    for token, after in _echoed(stream, echo):
        if after is not None:  # the last item's: the state after every token
            state = after
        if int(token[0]) != tok.eos_id:
            sys.stdout.write(text.push(int(token[0])))
            sys.stdout.flush()
    sys.stdout.write(text.finish() + "\n")
    return state


def _samples(model: RetNetLM, tok: Tokenizer, ids: torch.Tensor, state: RetNetState | None,
             opts: GenerateOptions, echo: str = "") -> None:
    """--num-samples N: N rows of the prompt ids [N, T] decoded together, row i with its own
    generator seeded seed + i (so sample i is what `--seed seed+i` alone gives); each is
    printed after the prompt under a `--- sample i ---` line once every row has finished."""
    if state is not None:  # one saved state, read by every row
        state = state.select([0] * ids.shape[0])
    seeds = [opts.seed + i for i in range(ids.shape[0])]
    stream = _echoed(generate_stream(model, ids, seed=seeds, state=state,
                                     **_sampling(opts, tok)), echo)
    streams = [TextStream(tok, opts.stop) for _ in range(ids.shape[0])]
    texts, done = [""] * ids.shape[0], [False] * ids.shape[0]
    for token, _ in stream:
        for row, t in enumerate(token.tolist()):
            done[row] = done[row] or t == tok.eos_id  # then pads follow
            if not done[row]:
                texts[row] += streams[row].push(t)
    for row, (text, rest) in enumerate(zip(texts, streams)):
        sys.stdout.write(f"\n--- sample {row} ---\n{text}{rest.finish()}")
    sys.stdout.write("\n")


def _check_paths(opts: GenerateOptions) -> None:
    """The files named by the options, checked before the model loads or anything prints."""
    if opts.prompt_file and opts.prompt_file != "-" and not Path(opts.prompt_file).is_file():
        raise ValueError(f"--prompt-file {opts.prompt_file} is not a file")
    if opts.state_out:
        out = Path(opts.state_out)
        if out.is_dir():
            raise ValueError(f"--state-out {out} is a directory; name a file in it, such as "
                             f"{out / 'state.safetensors'}")
        check_writable("--state-out", out)
    if opts.state_in and not Path(opts.state_in).is_file():
        raise ValueError(f"--state-in {opts.state_in} is not a file; pass one that "
                         "--state-out wrote")


def check_writable(option: str, path: Path) -> None:
    """Raise a one-line ValueError now, not after the work, where the file `path` cannot be
    written: its folder must exist and take a new file (tried: as root, os.access says yes to
    /proc and to read-only mounts), and it must not be a device or other special file, which
    the atomic rename of the save would replace."""
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: the directory {path.parent} does not exist; "
                         "create it first")
    if path.exists() and not path.is_file():
        raise ValueError(f"{option} {path} is not a regular file; name a new file")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".retnet-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot create a file in {path.parent} "
                         f"({err.strerror or err}); name a file in a writable folder") from None


def _read_prompt(path: str) -> str:
    """The prompt file's text ('-': standard input), which must be UTF-8."""
    if path == "-":
        stdin = sys.stdin
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
    else:
        data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text (byte {err.start})") from None


def _is_text(text: str) -> bool:
    """Whether text encodes as UTF-8 (argv can carry lone surrogates from undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
