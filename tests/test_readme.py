"""The README's command list and configuration block, held against the CLI and the config parser.

Both sides are read at test time (argparse's parser from ``infinibrain.cli.parser()``, the
dataclass fields of ManagerConfig and BoardConfig), so a command, option or key added to
the code without a README entry (or the other way round) fails here, naming it.
No manager, no sockets: plain text and parsing.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import pytest

from infinibrain import cli
from infinibrain.manager.config import BoardConfig, ManagerConfig, parse_config, parse_config_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The text of the README's ``## <title>...`` section, up to the next ``## ``."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(title)}.*?$", text, re.M)
    assert found, f"README.md has no '## {title}' section"
    end = text.find("\n## ", found.end())
    return text[found.end(): end if end >= 0 else len(text)]


# ---- the command list -------------------------------------------------------------------------


def readme_command_spans() -> list[str]:
    """The code spans of the sentence that starts with "Commands" in "## Operating it",
    outside parentheses (those hold remarks and examples), whitespace normalised."""
    text = section("Operating it")
    start = re.search(r"\bCommands\b", text)
    assert start, "README.md, '## Operating it': no sentence starting with 'Commands'"
    spans, depth, code, buf = [], 0, False, []
    i = start.start()
    while i < len(text):
        ch = text[i]
        if ch == "`":
            if code and depth == 0:
                spans.append(" ".join("".join(buf).split()))
            code, buf = not code, []
        elif code:
            buf.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1].isspace()):
            break
        i += 1
    assert spans, "README.md: the 'Commands' sentence lists no `commands`"
    return spans


class Entry:
    """One README command span: ``restart NAME [--board B] [--in-place]``."""

    def __init__(self, span: str) -> None:
        self.span = span
        tokens = re.findall(r"\[[^\[\]]*\]|[^\s\[\]]+", span)
        words = []
        while tokens and re.fullmatch(r"[a-z][a-z-]*", tokens[0]):
            words.append(tokens.pop(0))
        self.path = tuple(words[1:]) if words[:1] == ["infinibrain"] else tuple(words)  # () = the global options
        self.options: dict[str, bool] = {}  # option -> shown with a value
        self.positionals: list[tuple[str, bool]] = []  # (PLACEHOLDER, optional)
        for token in tokens:
            inner = token[1:-1].strip() if token.startswith("[") else token
            if inner.startswith("-"):
                first, *value = inner.split()
                for option in re.split(r"[|/]", first):
                    self.options[option] = bool(value)
            elif inner != "...":
                self.positionals.append((inner.split()[0], token.startswith("[")))


def cli_commands() -> tuple[dict[tuple[str, ...], argparse.ArgumentParser], set[tuple[str, ...]], set[tuple[str, ...]]]:
    """(parser of every command path, () for the global options; the leaf commands, those a
    user types; the "pseudo" ones, literal first words of a ``nargs="*"`` positional such as
    ``queue delete`` and ``images rm``, which share their parent's parser)."""
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    leaves: set[tuple[str, ...]] = set()
    pseudo: set[tuple[str, ...]] = set()

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        parsers[path] = parser
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if path and not subs:
            leaves.add(path)
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, path + (name,))
        for action in parser._actions:
            if not action.option_strings and action.nargs == "*" and isinstance(action.metavar, str):
                for word in re.findall(r"\[([a-z][a-z-]*)\]", action.metavar):
                    parsers[path + (word,)] = parser
                    leaves.add(path + (word,))
                    pseudo.add(path + (word,))

    walk(cli.parser(), ())
    return parsers, leaves, pseudo


def command_name(path: tuple[str, ...]) -> str:
    return "`" + " ".join(("infinibrain",) + path) + "`"


def visible_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each option a user is told about (not -h, not hidden ones), by its long spelling."""
    out = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        out[max(action.option_strings, key=len)] = action
    return out


def test_every_readme_command_exists_in_the_cli():
    _, leaves, _ = cli_commands()
    unknown = [e.span for e in map(Entry, readme_command_spans()) if e.path and e.path not in leaves]
    assert not unknown, (f"README.md ('## Operating it', the Commands sentence) lists commands the `infinibrain` "
                         f"CLI does not have: {unknown}")


def test_every_cli_command_is_in_the_readme():
    _, leaves, _ = cli_commands()
    listed = {e.path for e in map(Entry, readme_command_spans())}
    missing = sorted(" ".join(path) for path in leaves - listed)
    assert not missing, (f"README.md ('## Operating it', the Commands sentence) does not list these `infinibrain` "
                         f"commands: {missing}")
    assert () in listed, ("README.md's Commands sentence should show the global options, as "
                          "`infinibrain [--host H] ... COMMAND`")


def test_readme_options_are_the_cli_options():
    parsers, _, pseudo = cli_commands()
    entries = [e for e in map(Entry, readme_command_spans()) if e.path in parsers]
    problems = []
    for e in entries:
        for option, with_value in e.options.items():
            action = next((a for a in parsers[e.path]._actions if option in a.option_strings), None)
            if action is None:
                problems.append(f"`{e.span}`: {option} is not an option of {command_name(e.path)}")
            elif with_value != (action.nargs != 0):
                problems.append(f"`{e.span}`: {option} " + ("takes no value" if action.nargs == 0 else "takes a value"))
    # Every option of a command is shown on its entry (for `queue` and `images`, on one of
    # the entries sharing their parser: `queue delete`, `images rm`).
    for path, parser in parsers.items():
        if path in pseudo:
            continue
        shown = {o for e in entries if e.path == path or (e.path in pseudo and e.path[:-1] == path) for o in e.options}
        missing = sorted(set(visible_options(parser)) - shown)
        if missing:
            problems.append(f"{command_name(path)} has options the README does not show: {missing}")
    assert not problems, "README.md, '## Operating it', the Commands sentence:\n  " + "\n  ".join(problems)


def test_readme_positionals_are_the_cli_positionals():
    parsers, _, pseudo = cli_commands()
    problems = []
    for e in map(Entry, readme_command_spans()):
        if not e.path or e.path in pseudo or e.path not in parsers:
            continue
        actions = [a for a in parsers[e.path]._actions if not a.option_strings]
        if any(a.nargs == "*" or isinstance(a, argparse._SubParsersAction) for a in actions):
            continue  # `image`'s subcommands, or words such as `queue [NAME]` / `queue delete [NAME]`
        want = [(str(a.metavar or a.dest).upper(), a.nargs == "?") for a in actions]
        if e.positionals != want:
            problems.append(f"`{e.span}`: the CLI takes {' '.join(f'[{n}]' if o else n for n, o in want) or 'no arguments'}")
    assert not problems, "README.md, '## Operating it', the Commands sentence:\n  " + "\n  ".join(problems)


def test_the_deploy_line_in_the_readme_is_what_deploy_prints():
    """The README quotes deploy's output; deploy_outcome is what prints it."""
    text = " ".join(section("Operating it").split())
    assert "`classifier: updated on local; added on b2; removed from b3`" in text
    assert cli.deploy_outcome("classifier", {"local", "b3"}, ["local", "b2"], True) == \
        "classifier: updated on local; added on b2; removed from b3"
    assert cli.deploy_outcome("classifier", set(), ["local", "b2"], False) == "classifier: created on b2, local"
    assert cli.deploy_outcome("classifier", {"local", "b2"}, ["local", "b2"], False) == "classifier: unchanged on b2, local"
    assert cli.deploy_outcome("classifier", {"local", "b2"}, ["local"], False) == "classifier: unchanged on local; removed from b2"
    assert cli.deploy_outcome("classifier", {"local"}, ["b2"], True) == "classifier: added on b2; removed from local"


# ---- the configuration block ------------------------------------------------------------------


def readme_config() -> tuple[str, dict, dict, dict, dict]:
    """(the ```toml block of "## Configuration", its [manager] table, its first
    [[coprocessor]] table, and the keys shown commented out (``# key = value ...``) in each)."""
    found = re.search(r"```toml\n(.*?)```", section("Configuration"), re.S)
    assert found, "README.md, '## Configuration': no ```toml block"
    block = found.group(1)
    try:
        data = tomllib.loads(block)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"README.md, '## Configuration': the toml block is not valid TOML: {exc}")
    commented: dict[str, dict] = {"manager": {}, "coprocessor": {}}
    table = None
    for line in block.splitlines():
        header = re.match(r"^\[\[?([a-z_]+)\]\]?", line)
        if header:
            table = header.group(1)
            continue
        shown = re.match(r"^#\s*([a-z_]+)\s*=\s*(\S+)", line)
        if shown and table in commented:
            key, value = shown.groups()
            try:
                commented[table][key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                pytest.fail(f"README.md, '## Configuration': `# {key} = {value}` does not show a TOML value")
    boards = data.get("coprocessor") or [{}]
    return block, data.get("manager", {}), boards[0], commented["manager"], commented["coprocessor"]


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "boards"}  # boards: the [[coprocessor]] list


@pytest.mark.parametrize("cls, table", [(ManagerConfig, "[manager]"), (BoardConfig, "[[coprocessor]]")])
def test_readme_config_keys_are_the_config_fields(cls, table):
    _, manager, board, manager_shown, board_shown = readme_config()
    readme = set(manager) | set(manager_shown) if cls is ManagerConfig else set(board) | set(board_shown)
    known = set(config_fields(cls))
    unknown, missing = sorted(readme - known), sorted(known - readme)
    assert not unknown, f"README.md, '## Configuration', {table}: keys that {cls.__name__} does not have: {unknown}"
    assert not missing, f"README.md, '## Configuration', {table}: {cls.__name__} keys the README does not show: {missing}"


def test_readme_config_values_are_the_defaults():
    """Each value shown is the default, except the few shown as examples."""
    examples = {"state_dir", "ssh_user", "known_hosts"}  # "" = a per-user folder; required; "" = ~/.ssh/known_hosts
    _, manager, board, manager_shown, board_shown = readme_config()
    wrong = []
    # The table's own keys first: `# transport = "ssh" only:` heads the commented ssh keys.
    for cls, shown in ((ManagerConfig, {**manager_shown, **manager}), (BoardConfig, {**board_shown, **board})):
        for key, f in config_fields(cls).items():
            if key in examples or key not in shown or f.default is dataclasses.MISSING:
                continue
            if shown[key] != f.default:
                wrong.append(f"{key} = {shown[key]!r} (the default is {f.default!r})")
    assert not wrong, "README.md, '## Configuration': values that are not the defaults: " + ", ".join(wrong)


def test_readme_config_block_parses():
    block, manager, board, _, board_shown = readme_config()
    cfg = parse_config_text(block)
    assert [b.name for b in cfg.boards] == [board["name"]]
    # The ssh keys shown commented out make a valid ssh board with the rest of the table.
    ssh_board = {**board, **board_shown, "name": "ssh-board", "transport": "ssh", "address": "127.0.0.2"}
    cfg = parse_config({"manager": manager, "coprocessor": [ssh_board]})
    assert cfg.boards[0].transport == "ssh" and cfg.boards[0].ssh_user == board_shown["ssh_user"]
