"""config.py (one command-line surface: config files, --key=value and --key value) and
common.cli's error line."""
import dataclasses

import pytest

import common
import config


@dataclasses.dataclass
class Cfg:
    out_dir: str = "out/x"
    learning_rate: float = 3e-4
    max_iters: int = 100
    batch_size: int = 8
    compile: bool = False
    n_kv_head: int | None = None
    prompt: str = "hi"
    betas: tuple = (0.9, 0.95)


@dataclasses.dataclass
class Args:
    input: list[str] | None = None   # files
    out: str = ""
    ckpt: str | None = None
    sft: bool = False
    temperature: float = 0.8


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("# launch: python train.py c.py\nimport math\nbatch_size = 4\n"
                 "max_iters = batch_size * 25\nlearning_rate = 1e-3\n")
    argv = [str(f), "--max_iters=7", "--out_dir=out/y"]
    cfg = config.parse_args(Cfg(), config_file=True, argv=argv)
    assert (cfg.batch_size, cfg.max_iters, cfg.learning_rate, cfg.out_dir) == (4, 7, 1e-3, "out/y")
    assert Cfg().max_iters == 100  # the defaults are not mutated


def test_config_sharp_edges():
    cfg = config.parse_args(Cfg(), ["--learning_rate=1", "--n_kv_head=2", "--prompt=a=b c",
                                    "--max_iters=1e4", "--betas=(0.8, 0.99)"])
    # an int where a float is expected
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.n_kv_head == 2  # a None default can be overridden
    assert cfg.prompt == "a=b c"  # split on the first '=' only
    assert cfg.max_iters == 10000 and isinstance(cfg.max_iters, int)
    assert cfg.betas == (0.8, 0.99)
    assert config.parse_args(Cfg(), ["--prompt=42"]).prompt == "42"  # a str stays a str
    assert config.parse_args(Cfg(), ["--n_kv_head=None"]).n_kv_head is None  # and set back to None


def test_config_none_default_is_type_checked_against_its_annotation():
    # int | None: a wrong value is refused here, not as a traceback deep in llm.py later.
    with pytest.raises(ValueError, match=r"n_kv_head"):
        config.parse_args(Cfg(), ["--n_kv_head=auto"])
    with pytest.raises(ValueError, match=r"n_kv_head expects int"):
        config.parse_args(Cfg(), ["--n_kv_head=2.5"])


@pytest.mark.parametrize("arg,want", [("--compile", True), ("--compile=True", True),
                                      ("--compile=true", True), ("--compile=1", True),
                                      ("--compile=False", False), ("--compile=0", False),
                                      ("--compile=false", False)])
def test_config_bools(arg, want):
    assert config.parse_args(Cfg(compile=not want), [arg]).compile is want


def test_config_unknown_key_names_close_keys(tmp_path):
    match = r"unknown config key 'learning_rat'.*did you mean learning_rate"
    with pytest.raises(ValueError, match=match):
        config.parse_args(Cfg(), ["--learning_rat=1"])
    f = tmp_path / "c.py"
    f.write_text("batch_sise = 3\n")
    with pytest.raises(ValueError, match=r"'batch_sise' in .*c\.py.*did you mean batch_size"):
        config.parse_args(Cfg(), config_file=True, argv=[str(f)])


def test_config_wrong_type_is_one_line():
    with pytest.raises(ValueError, match=r"max_iters expects int \(default 100\), got 'abc'") as e:
        config.parse_args(Cfg(), ["--max_iters='abc'"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"max_iters expects int.*got 2\.5"):
        config.parse_args(Cfg(), ["--max_iters=2.5"])
    with pytest.raises(ValueError, match=r"compile expects bool.*got 'yes'"):
        config.parse_args(Cfg(), ["--compile='yes'"])


def test_config_unparsable_value():
    with pytest.raises(ValueError, match=r"could not parse --learning_rate=fast: expected a float"):
        config.parse_args(Cfg(), ["--learning_rate=fast"])


def test_config_key_without_value():
    with pytest.raises(ValueError, match=r"--batch_size needs a value"):
        config.parse_args(Cfg(), ["--batch_size"])


def test_config_stray_argument():
    with pytest.raises(ValueError, match=r"unexpected argument 'x'"):
        config.parse_args(Cfg(), ["--batch_size=2", "x"])


def test_config_missing_config_file():
    with pytest.raises(FileNotFoundError, match=r"config file nope\.py does not exist"):
        config.parse_args(Cfg(), ["nope.py"], config_file=True)


def failing_main():
    raise ValueError("bad thing\nsecond line: fix it")


def test_cli_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("KILN_DEBUG", "0")
    with pytest.raises(SystemExit) as e:
        common.cli(failing_main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad thing second line: fix it\n"
    common.cli(lambda: None)  # success: no exit


def test_cli_prints_the_traceback_with_kiln_debug(capsys, monkeypatch):
    monkeypatch.setenv("KILN_DEBUG", "1")
    with pytest.raises(SystemExit):
        common.cli(failing_main)
    assert "Traceback" in capsys.readouterr().err


def test_space_separated_values():
    argv = ["--input", "a.txt", "b.jsonl:0.5", "--sft", "--temperature", "-1", "--out", "x"]
    got = config.parse_args(Args(), argv)
    assert got == Args(input=["a.txt", "b.jsonl:0.5"], out="x", sft=True, temperature=-1.0)


def test_list_field_takes_one_or_more_values():
    assert config.parse_args(Args(), ["--input=a.txt"]).input == ["a.txt"]
    with pytest.raises(ValueError, match=r"--input needs at least one value"):
        config.parse_args(Args(), ["--input", "--sft"])


def test_positional_fields():
    got = config.parse_args(Args(), ["c", "o"], positional=("ckpt", "out"))
    assert got == Args(ckpt="c", out="o")
    with pytest.raises(ValueError, match=r"unexpected argument 'p'"):
        config.parse_args(Args(), ["c", "o", "p"], positional=("ckpt", "out"))


def test_help_lists_every_key_with_its_comment(capsys):
    @dataclasses.dataclass
    class Shots:
        shots: int = 0               # few-shot examples from dev
        chat: bool = False
    with pytest.raises(SystemExit) as e:
        config.parse_args(Shots(), ["--help"], doc="Score MMLU.")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Score MMLU.")
    assert "--shots" in out and "few-shot examples from dev" in out and "--chat" in out


def test_text_keys_keep_what_was_typed():
    @dataclasses.dataclass
    class Args:
        prompt: str | None = None
        system: str = ""
    got = config.parse_args(Args(), ["--prompt", "'hi there'", "--system", "None"])
    assert got == Args(prompt="'hi there'", system="None")
    assert config.parse_args(Args(), ["--prompt=None"]).prompt is None  # back to its None default
    assert config.parse_args(Args(), ["--prompt=[1, 2]"]).prompt == "[1, 2]"


def test_an_option_is_never_taken_for_a_value():
    @dataclasses.dataclass
    class Args:
        prompt: str | None = None
        chat: bool = False
    with pytest.raises(ValueError, match=r"--prompt needs a value"):
        config.parse_args(Args(), ["--prompt", "--chat"])
