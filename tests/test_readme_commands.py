"""The command lines the documentation shows are ones the CLI accepts (documentation drift).

Read: README.md (fenced blocks but Python ones, and inline code spans, which may wrap lines), docs/**/*.md,
Dockerfile.jetson and scripts/*.sh (their indented ``#`` usage lines: ``docker run ... lungedge:TAG ARGS``
hands ARGS to the image's ENTRYPOINT, lungedge) and benchmarks/*.py, scripts/*.py (indented docstring usage
lines, inline code spans). Judged, without running anything:

- every ``lungedge ...`` line, and every inline span that starts with a command's name (prose's
  `eval --gate`), is parsed by the CLI's own click commands: an unknown (sub)command or option, a value an
  option cannot take (`--epochs many`), a word left over, or a word outside the names lungedge itself checks
  an option against (`--device gpu`, `--backend ort`: click takes any string there) fails, naming the file
  and line. A required argument left out (prose names commands without one: `lungedge export`) and an option
  named without its value in prose (`bench --seconds`) pass; no file a line names has to exist here;
- an inline span of options alone (`--calib-method`) names options some lungedge command or project script
  has;
- a line that runs a script of benchmarks/ or scripts/ gives it only options its argparse parser declares.

Not caught: a command line in running prose outside code spans, a line that parses but would fail on its
files or numbers (a missing checkpoint, `--lr 5`), and what the text around a line claims it does.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SEPARATORS = {"|", "||", "&&", ";", "&"}  # a shell pipeline or list: each part is a command of its own
REDIRECTIONS = {"<", ">", ">>", "2>", "2>>", "&>", "1>"}  # the next word is a file, not an argument
ELLIPSES = {"...", "…"}  # "and so on" in a usage line
OPTION = re.compile(r"--?[A-Za-z][\w-]*")


# --- the CLI and the scripts: what they accept

def _click_exceptions():
    try:
        from typer._click import exceptions  # typer >= 0.20 carries its own click
    except ImportError:  # pragma: no cover - older typer depends on click
        from click import exceptions
    return exceptions


@functools.lru_cache(maxsize=1)
def _root():
    import typer

    from lungedge.cli import app

    return typer.main.get_command(app)


def _walk(cmd):
    yield cmd
    for sub in getattr(cmd, "commands", {}).values():
        yield from _walk(sub)


@functools.lru_cache(maxsize=1)
def cli_options() -> frozenset[str]:
    """Every option of every lungedge command (``--help`` too)."""
    names = {"--help"}
    for cmd in _walk(_root()):
        for param in cmd.params:
            names.update(getattr(param, "opts", ()))
            names.update(getattr(param, "secondary_opts", ()))
    return frozenset(o for o in names if o.startswith("-"))


@functools.lru_cache(maxsize=None)
def script_options(script: str) -> frozenset[str] | None:
    """The options a project script's argparse parser declares (a .sh hands its arguments to the .py of the
    same name), ``--help`` and ``-h`` included; None when the script is not in this checkout."""
    path = ROOT / script
    if path.suffix == ".sh":
        path = path.with_suffix(".py")
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    found = re.findall(r"add_argument\(\s*((?:[\"']-[^\"']+[\"']\s*,\s*)+)", text)
    return frozenset({"--help", "-h"} | {o for group in found for o in re.findall(r"[\"'](-[^\"']+)[\"']", group)})


@functools.lru_cache(maxsize=1)
def all_script_options() -> frozenset[str]:
    scripts = [p for d in ("benchmarks", "scripts") for p in sorted((ROOT / d).glob("*.py"))]
    return frozenset(o for p in scripts for o in script_options(str(p.relative_to(ROOT))) or ())


def parse_problem(args: list[str], prose: bool = False) -> str | None:
    """Why the CLI would refuse ``lungedge ARGS`` (an unknown command or option, a value an option cannot take,
    a word left over, a name outside the option's list), else None; nothing is run. A required argument left
    out and --help are no problem; with ``prose``, neither is a last option named without its value."""
    why, ctx = _parse([a for a in args if a != "--help"], prose)  # (--help would print the help)
    return why if ctx is None else value_problem(ctx)


def _parse(args: list[str], prose: bool, resilient: bool = False):
    """(why click refuses ARGS, None), or (None, the leaf command's context; None where parsing stopped early
    for a reason that is no problem). Where a required argument is left out, the line is parsed again as
    shell completion does (``resilient``), for the values it does give."""
    import typer

    exc = _click_exceptions()
    cmd = _root()
    try:
        ctx = cmd.make_context("lungedge", list(args), resilient_parsing=resilient)
        while hasattr(cmd, "resolve_command"):  # a group: find the sub-command as its invoke does
            rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
            if not rest:
                return None, None  # a group named alone (`lungedge data`)
            name, cmd, rest = cmd.resolve_command(ctx, rest)
            ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=resilient)
    except exc.MissingParameter:
        return (None, None) if resilient else _parse(args, prose, resilient=True)
    except (exc.NoArgsIsHelpError, typer.Exit):
        return None, None  # a group named alone
    except exc.BadOptionUsage as error:
        if prose and args and error.option_name == args[-1] and "requires an argument" in error.message:
            return None, None  # `bench --seconds`: the option exists; prose leaves its value out
        return error.format_message(), None
    except exc.BadParameter as error:
        if getattr(getattr(error.param, "type", None), "name", "") == "path":
            return None, None  # a path the CLI checks exists: true on the machine the line is meant for
        return error.format_message(), None
    except exc.UsageError as error:  # NoSuchOption, "No such command", extra arguments
        return error.format_message(), None
    return None, ctx


@functools.lru_cache(maxsize=1)
def option_values() -> dict:
    """Option -> (the names it takes, from lungedge's own tables; whether a comma list; case-blind): the
    options whose words lungedge checks itself (click takes any string), per command where they differ."""
    from lungedge import bundle, mlp_backends, quantize, saliency
    from lungedge.data.defaults import GROUP_BY
    from lungedge.export import declared
    from lungedge.runners import registry

    backends, precisions = tuple(registry.BACKENDS), registry.PRECISIONS
    return {
        "--device": (registry.DEVICES, False, False),
        "--backend": (backends, True, False),
        "--precision": (precisions, True, False),
        ("lungedge predict", "--backend"): (backends, False, False),  # predict runs one file one way
        ("lungedge predict", "--precision"): (precisions, False, False),
        ("lungedge mlp train", "--backend"): (mlp_backends.BACKENDS, False, False),
        ("lungedge bundle create", "--precision"): (bundle.PRECISIONS, True, False),  # the ONNX variants
        "--group-by": (GROUP_BY, False, False),
        "--method": (saliency.METHODS, False, False),
        "--calib-method": (quantize.CALIB_METHODS, False, False),
        "--output": (declared.OUTPUT_KINDS, False, False),
        "--resize": (tuple(declared.RESIZE_WORDS), False, False),
        "--channels": (declared.CHANNEL_ORDERS, False, True),
        "--layout": (("NCHW", "NHWC"), False, True),
    }


def value_problem(ctx) -> str | None:
    """The first option value given on the line that is not one of the names lungedge takes for it. A usage
    line's ``a|b|c`` is each of a, b and c; a placeholder (``<name>``, ``{name}``) passes."""
    table = option_values()
    for param in ctx.command.params:
        if getattr(ctx.get_parameter_source(param.name), "name", None) != "COMMANDLINE":
            continue
        for opt in getattr(param, "opts", ()):
            rule = table.get((ctx.command_path, opt)) or table.get(opt)
            value = ctx.params.get(param.name)
            if rule is None or not isinstance(value, str) or re.fullmatch(r"<[^>]*>|\{[^}]*\}", value):
                continue
            names, comma_list, fold = rule
            words = [w.strip() for alt in value.split("|") for w in (alt.split(",") if comma_list else [alt])]
            bad = [w for w in words if (w.upper() if fold else w) not in names]
            if bad:
                return f"{opt} {value!r}: {', '.join(map(repr, bad))} is not one of {', '.join(names)}"
    return None


# --- reading shell lines

def _words(line: str) -> list[str]:
    """A shell line's words (quotes removed, a ``#`` comment dropped); [] when the shell could not split it."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unclosed quote: prose, not a command
        return []


def _segments(words: list[str]) -> list[list[str]]:
    """The commands of a pipeline or list (``a && b | c > f``), each without its redirections."""
    parts, current, skip = [], [], False
    for word in words:
        if skip:
            skip = False
        elif word in SEPARATORS:
            parts.append(current)
            current = []
        elif word in REDIRECTIONS:
            skip = True
        elif not re.fullmatch(r"[12&]?>>?\S+|[12]?>&[12]", word):  # 2>&1, >log.txt
            current.append(word)
    parts.append(current)
    return [p for p in parts if p]


def _command_words(words: list[str]) -> list[str]:
    """``words`` without a leading ``$`` prompt, ``VAR=value`` assignments and ``sudo``."""
    i = 0
    while i < len(words) and (words[i] in ("$", "sudo") or re.fullmatch(r"[A-Za-z_]\w*=\S*", words[i])):
        i += 1
    return words[i:]


def lungedge_args(words: list[str]) -> list[str] | None:
    """The arguments one command gives lungedge (``lungedge ...``, ``.venv/bin/lungedge ...``, ``python -m
    lungedge ...``, ``docker run ... lungedge:TAG ...`` without --entrypoint), else None."""
    words = _command_words(words)
    if not words:
        return None
    first = words[0]
    if first.rsplit("/", 1)[-1] == "lungedge":
        return words[1:]
    if re.fullmatch(r"(\S*/)?python3?(\.\d+)?", first) and words[1:3] == ["-m", "lungedge"]:
        return words[3:]
    if first == "docker" and words[1:2] == ["run"] and "--entrypoint" not in words:
        for j, word in enumerate(words):
            if word.startswith("lungedge:"):
                return words[j + 1:]
    return None


def script_args(words: list[str]) -> tuple[str, list[str]] | None:
    """(the script, its arguments) for a command that runs a script of benchmarks/ or scripts/ (``bash
    scripts/gpu_check.sh ...``, ``.venv/bin/python benchmarks/x.py ...``, ``benchmarks/x.py ...``), else None."""
    words = _command_words(words)
    if words and (re.fullmatch(r"(\S*/)?(python3?(\.\d+)?|bash|sh)", words[0])):
        words = words[1:]
    if words and re.fullmatch(r"(\./)?(benchmarks|scripts)/[\w.-]+\.(py|sh)", words[0]):
        return words[0].removeprefix("./"), words[1:]
    return None


def _usage_cleaned(args: list[str]) -> list[str]:
    """A usage line's words as the shell would pass them: ``[--seed 0]`` -> ``--seed 0``, ``...`` dropped,
    ``--fp16/--int8`` -> ``--fp16 --int8``."""
    cleaned = []
    for word in args:
        word = word.strip("[]")
        if re.fullmatch(r"--[\w-]+(/--[\w-]+)+", word):
            cleaned += word.split("/")
        elif word and word not in ELLIPSES:
            cleaned.append(word)
    return cleaned


def _alternatives(args: list[str]) -> list[list[str]]:
    """Prose's ``data inspect / split / audit``, ``data inspect/split``, ``eval/bench --device cuda`` and
    ``bundle / engine build``: one argument list per command named. A word after a lone ``/`` names a
    command of the group the first one's last command word belongs to (``mlp demo / train``: ``mlp train``),
    else a top-level one. A command word of a few names joined by ``/`` is one list per name."""
    pieces = [[]]
    for word in args:
        if word == "/":
            pieces.append([])
        else:
            pieces[-1].append(word)
    first, out = pieces[0], []
    path, group = [], _root()  # the command words of `first` that name groups, and the last such group
    for word in first:
        sub = getattr(group, "commands", {}).get(word)
        if sub is None or not hasattr(sub, "commands"):
            break
        path, group = path + [word], sub
    for i, alt in enumerate(pieces):
        if i and alt:
            alt = path + alt if alt[0] in group.commands else alt
        if alt or i == 0:
            out += _split_command_words(alt)
    return out


def _split_command_words(args: list[str]) -> list[list[str]]:
    cmd = _root()
    for i, word in enumerate(args):
        commands = getattr(cmd, "commands", None)
        if not commands:
            break
        names = word.split("/")
        if len(names) > 1 and all(n in commands for n in names):
            return [alt for n in names for alt in _split_command_words(args[:i] + [n] + args[i + 1:])]
        if word not in commands:
            break
        cmd = commands[word]
    return [args]


def _is_template(args: list[str]) -> bool:
    """``python -m lungedge ARGS``: a placeholder where the command goes."""
    return bool(args) and re.fullmatch(r"[A-Z][A-Z_]*|<[^>]*>|\{[^}]*\}", args[0]) is not None


# --- where the command lines are

def _continued(numbered):
    """(number of its first line, logical line): a line ending in ``\\`` (``\\\\`` in a docstring's source) is
    joined to the next, as the shell does."""
    pending, start = "", 0
    for number, raw in numbered:
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip().rstrip("\\") + " "
            continue
        yield start, pending + raw
        pending = ""
    if pending:
        yield start, pending


def _fenced_lines(lines: list[str]):
    """(line number, logical line) for each line of the fenced blocks that are not Python."""
    in_block, language, inside = False, "", []
    for number, raw in enumerate(lines, 1):
        fence = re.match(r"\s*(```+|~~~+)\s*(\S*)", raw)
        if fence:
            in_block, language = not in_block, fence.group(2).lower()
        elif in_block and language not in ("python", "py", "pycon"):
            inside.append((number, raw))
        if fence and not in_block:  # a block ends: its lines, continuations joined within it
            yield from _continued(inside)
            inside = []


def _inline_spans(lines: list[str], skip_fenced: bool):
    """(line number of its start, text) of every inline code span (`...` or ``...``), outside fenced blocks.
    As in Markdown, a span may wrap onto the next lines of its paragraph (a line break reads as a space)."""
    paragraphs, current, in_block = [], [], False
    for number, raw in enumerate(lines, 1):
        fence = skip_fenced and re.match(r"\s*(```+|~~~+)", raw)
        if fence or in_block or not raw.strip():
            in_block = in_block != bool(fence)
            paragraphs.append(current)
            current = []
        else:
            current.append((number, raw))
    paragraphs.append(current)
    for paragraph in filter(None, paragraphs):
        text = "\n".join(raw for _, raw in paragraph)
        for match in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
            number = paragraph[text.count("\n", 0, match.start())][0]
            yield number, " ".join(match.group(2).split())


def snippets(text: str, kind: str = "markdown") -> list[tuple[int, str, bool]]:
    """(line number, the text, whether it is an inline span) of every place ``text`` may show a command.

    ``markdown``: fenced blocks (but Python) and inline spans; ``shell`` (a Dockerfile, a script): ``#``
    comment lines indented as usage lines are (``#   docker run ...``) and inline spans of any comment;
    ``python``: indented docstring lines (usage lines) and inline spans."""
    lines = text.splitlines()
    if kind == "markdown":
        return ([(n, line, False) for n, line in _fenced_lines(lines)]
                + [(n, s, True) for n, s in _inline_spans(lines, skip_fenced=True)])
    if kind == "shell":
        comments = [(n, raw.lstrip()[1:]) for n, raw in enumerate(lines, 1) if raw.lstrip().startswith("#")]
        usage = [(n, line) for n, line in comments if re.match(r"\s{2,}\S", line)]
        return ([(n, line, False) for n, line in _continued(usage)]
                + [(n, s, True) for n, line in comments for _, s in _inline_spans([line], skip_fenced=False)])
    usage = [(n, raw) for n, raw in enumerate(lines, 1) if re.match(r"\s{4,}[^\s#>]", raw)]
    return ([(n, line, False) for n, line in _continued(usage)]
            + [(n, s, True) for n, s in _inline_spans(lines, skip_fenced=False)])


def documented_commands(text: str, kind: str = "markdown") -> list[tuple[int, str, list[str], bool]]:
    """(line number, the text, lungedge's arguments, whether prose) for every lungedge command in ``text``;
    an inline span that starts with a command's name (`eval --gate`) counts as ``lungedge`` + the span."""
    top_level = set(_root().commands)
    found = []
    for number, snippet, span in snippets(text, kind):
        for segment in _segments(_words(snippet)):
            args = lungedge_args(segment)
            if args is None and span and segment[0] in top_level:
                args = segment
            if args is not None and not _is_template(args):
                found += [(number, snippet, alt, span) for alt in _alternatives(_usage_cleaned(args))]
    return found


def problems(text: str, source: str, kind: str = "markdown") -> list[str]:
    """``source:LINE: `the text`: why`` for every command line in ``text`` the CLI (or the script it runs)
    would refuse, and every option span naming an option nothing has."""
    out = []

    def refuse(number, snippet, why):
        out.append(f"{source}:{number}: `{' '.join(snippet.split())}`: {why}")

    for number, snippet, args, prose in documented_commands(text, kind):
        why = parse_problem(args, prose=prose)
        if why:
            refuse(number, snippet, why)
    for number, snippet, span in snippets(text, kind):
        for segment in _segments(_words(snippet)):
            script = script_args(segment)
            if script is not None:
                known = script_options(script[0])
                if known is None:
                    refuse(number, snippet, f"no such script: {script[0]}")
                    continue
                names = [w.split("=")[0] for w in _usage_cleaned(script[1])]
                unknown = [n for n in names if OPTION.fullmatch(n) and n not in known]
                if unknown:
                    refuse(number, snippet, f"{script[0]} has no option {', '.join(unknown)}")
            elif span and segment[0].startswith("-"):  # `--calib-method`, `--device cuda`, `--fp16/--int8`
                names = [n for w in _usage_cleaned(segment) for n in [w.split("=")[0]] if OPTION.fullmatch(n)]
                unknown = [n for n in names if n not in cli_options() | all_script_options()]
                if unknown:
                    refuse(number, snippet, f"no lungedge command or project script has {', '.join(unknown)}")
    return out


# --- the tests

def _documents():
    yield "README.md", "markdown"
    yield "Dockerfile.jetson", "shell"
    for pattern, kind in (("docs/**/*.md", "markdown"), ("benchmarks/*.py", "python"), ("scripts/*.py", "python"),
                          ("scripts/*.sh", "shell")):
        for path in sorted(ROOT.glob(pattern)):
            yield str(path.relative_to(ROOT)), kind


@pytest.mark.parametrize("source,kind", list(_documents()))
def test_documented_command_lines_are_accepted_by_the_cli(source, kind):
    path = ROOT / source
    if not path.is_file():
        pytest.skip(f"{source} is not in this checkout")
    found = problems(path.read_text(encoding="utf-8"), source, kind)
    assert not found, "command lines the CLI does not accept:\n" + "\n".join(found)


def test_the_readme_shows_every_command():
    """The extractor finds the README's commands (a broken one would pass every line by finding none)."""
    commands = documented_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    named = {tuple(args[:2]) if args[:1] in (["data"], ["mlp"], ["bundle"], ["engine"]) else tuple(args[:1])
             for _, _, args, _ in commands}
    assert len(commands) >= 80
    for expected in [("data", "inspect"), ("data", "split"), ("data", "audit"), ("mlp", "demo"), ("mlp", "train"),
                     ("mlp", "export"), ("models",), ("train",), ("finetune",), ("export",), ("bench",), ("eval",),
                     ("predict",), ("report",), ("bundle", "create"), ("bundle", "verify"), ("bundle", "extract"),
                     ("engine", "build"), ("demo",), ("cv",)]:
        assert expected in named, expected


def test_the_command_lines_of_a_bundles_readme_are_accepted():
    """``bundle create`` writes a README with the commands to run on the Jetson: they parse too."""
    from lungedge.bundle import readme_text

    files = {v: f"engines/googlenet/googlenet.{v}.onnx" for v in ("fp32", "fp16", "int8", "int8-cpu")}
    describe = {"fp32": {"framework": "torch", "classes": ["Benign", "Malignant", "Normal"],
                         "input_shape": [1, 3, 224, 224]}}
    text = readme_text("googlenet-jetson", "googlenet", files, describe)
    commands = documented_commands(text)
    assert {tuple(args[:2]) for _, _, args, _ in commands} >= {("bundle", "verify"), ("bundle", "extract"),
                                                               ("engine", "build"), ("bench", "googlenet"),
                                                               ("eval", "googlenet"), ("report", "--results")}
    found = problems(text, "the bundle's README.md")
    assert not found, "\n".join(found)


SAMPLE = """\
Some prose with `lungedge bench --no-such-flag` inline, and `lungedge export` named alone; `eval --gate` and
`bench --seconds` are fine, `predict --explains` is not; nor is `--calib-methd`, while `--calib-method` is. A span
may wrap: `lungedge eval smallcnn
--bootstraps 200`.

```bash
lungedge data inspect ../shared/data/iq-oth-nccd      # a comment --not-an-option
lungedge bench --device cpu --all --batch-sizes 1,8 | tee out.txt && lungedge report --colour red
.venv/bin/lungedge train smallcnn --data DATA \\
    --epochs 3 --weigths none
lungedge predict <model> scan.png > preds.txt 2>&1
lungedge dat inspect folder
lungedge mlp train [--steps 300] [--lr 0.1] [--backend numpy|torch|micrograd] [--json]
lungedge mlp demo [--seeds 0]
lungedge export densenet121 --fp16 yes
lungedge bench --warmup many
docker run --rm --runtime nvidia lungedge:jp6 bench --device cuda --bogus
docker run --rm --entrypoint python lungedge:jp6 -c "print(1)"
PYTHONPATH=. .venv/bin/python benchmarks/bench_dedup.py --sizes 10 --treshold 0.8
bash scripts/gpu_check.sh --dry-run
lungedge bench --seconds
lungedge bench googlenet --backend onnxruntime,ort --device cpu
lungedge data split DATA --group-by near
```

```python
lungedge = "lungedge bench --python-is-not-checked"
```

Alternatives in prose: `lungedge data inspect / split / audit`, `lungedge mlp demo / train`, `data inspect/splat`,
`lungedge bundle / engine build / nope`, `export --fp16/--int9`.
"""


def test_checker_names_every_bad_line_and_passes_the_good_ones():
    found = problems(SAMPLE, "SAMPLE.md")
    where = [line.split(": `")[0].split(":")[1] for line in found]
    assert where == ["8", "9", "12", "14", "15", "16", "17", "21", "22", "23",  # fenced lines
                     "1", "2", "3", "30", "31", "31",  # inline spans
                     "19", "2"], found  # a script's option, an option span
    text = "\n".join(found)
    for why in ("--colour", "--weigths", "'dat'", "--seeds", "(yes)", "'--warmup'", "--bogus", "--no-such-flag",
                "--explains", "'nope'", "'inspect/splat'", "--int9", "--seconds' requires an argument", "--treshold",
                "has --calib-methd", "--bootstraps", "'ort' is not one of",
                "'near' is not one of"):
        assert why in text, why


def test_checker_reads_shell_comments_and_docstrings():
    dockerfile = ("# lungedge on a Jetson: prose, not a command\n"
                  "#   docker run --rm -it lungedge:jp6 bench --devise cuda\n"
                  "RUN lungedge --help\n")
    assert [p.split(": `")[0] for p in problems(dockerfile, "Dockerfile", "shell")] == ["Dockerfile:2"]
    script = ('"""Run it as ``lungedge eval smallcnn --gates``, or ``python -m lungedge ARGS``.\n\n'
              '    lungedge bench --iter 5\n"""\n')
    found = problems(script, "x.py", "python")
    assert [p.split(": `")[0] for p in found] == ["x.py:3", "x.py:1"], found
