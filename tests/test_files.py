"""Output paths: every command says what is wrong with a path it cannot write, and a run stays inside --out."""

import json

import pytest
from inprocess import run_main
from synthetic import analytic, measured, write_run

from hhbench.errors import UserError
from hhbench.files import make_folder, open_output, replace_whole, run_folder


def one_line(result, text: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in result.stderr, result.stderr


@pytest.fixture
def blocker(tmp_path):
    """A regular file where outputs expect a folder."""
    path = tmp_path / "plain"
    path.write_text("not a folder\n")
    return path


def test_open_output_names_the_file_in_the_way(blocker, tmp_path):
    for target in (blocker / "x.csv", blocker / "deeper" / "still" / "x.csv"):
        with pytest.raises(UserError, match=f"cannot write {target}: {blocker} is a file, not a folder$"):
            open_output(target, "w")
    with pytest.raises(UserError, match=f"cannot write {tmp_path}: {tmp_path} is a folder, not a file$"):
        open_output(tmp_path, "w")
    with pytest.raises(UserError, match=f"{blocker} is a file, not a folder$"):
        make_folder(blocker)
    with pytest.raises(UserError, match=f"{blocker} is a file, not a folder$"):
        make_folder(blocker / "run")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "gone")
    with pytest.raises(UserError, match="is a broken link|No such file"):
        open_output(tmp_path / "dangling" / "x.csv", "w")
    assert make_folder(tmp_path / "a" / "b").is_dir()
    with open_output(tmp_path / "c" / "d.txt", "w") as out:
        out.write("ok")
    assert (tmp_path / "c" / "d.txt").read_text() == "ok"


def test_a_file_replaced_whole_names_what_is_in_the_way(blocker, tmp_path):
    """replace_whole writes beside the file and renames: a folder where the file must be is found at the rename, and
    said in one line as open_output says it, with no temporary left behind."""
    with pytest.raises(UserError, match=f"cannot write {blocker / 'x.jsonl'}: {blocker} is a file, not a folder$"):
        with replace_whole(blocker / "x.jsonl") as out:
            out.write("{}\n")
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(UserError, match="rows.jsonl is a folder, not a file$"):
        with replace_whole(tmp_path / "rows.jsonl") as out:
            out.write("{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "rows.jsonl"]


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "a\\b", "/tmp/abs", "", "  "])
def test_a_run_name_stays_inside_out(name, tmp_path):
    with pytest.raises(UserError, match="bad run name"):
        run_folder(tmp_path, name)


def test_plain_run_names_are_accepted(tmp_path):
    for name in ("cpu", "eval-tiny", "run.2", "..x"):
        assert run_folder(tmp_path, name) == tmp_path / name


def test_every_command_says_what_is_wrong_with_its_output(blocker, tmp_path):
    why = f"{blocker} is a file, not a folder"
    one_line(run_main("flops", "--model", "tiny", "--contexts", "1k", "--csv", str(blocker / "f.csv")), why)
    run = write_run(tmp_path / "run", measured(analytic(contexts=[256])), env={"device": "cpu"})
    one_line(run_main("gate", str(run), str(run), "--json", str(blocker / "g.json")), why)
    one_line(run_main("report", str(run), "--out", str(blocker / "r.html")), why)
    one_line(run_main("table", str(run), "--csv", str(blocker / "t.csv")), why)
    one_line(run_main("select-heads", "--model", "tiny-random-llama", "--out", str(blocker / "h.json")), why)
    one_line(run_main("sweep", "--models", "tiny", "--contexts", "32", "--out", str(blocker)), why)
    one_line(run_main("eval", "--model", "tiny-random-llama", "--out", str(blocker)), why)


@pytest.mark.parametrize("command", ["sweep", "eval"])
@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b"])
def test_commands_keep_the_run_inside_out(command, name, tmp_path):
    args = ["--models", "tiny", "--contexts", "32"] if command == "sweep" else ["--model", "tiny-random-llama"]
    one_line(run_main(command, *args, "--out", str(tmp_path / "out"), "--run", name), "bad run name")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_processes_making_the_same_folder_at_once_each_find_it_writable(tmp_path):
    """A launch's workers check the run folder as they start, side by side: one's write probe must not be another's
    (a shared probe file, unlinked by one while another checked it, failed a worker with 'No such file')."""
    from concurrent.futures import ThreadPoolExecutor

    def check(_):
        for _ in range(300):
            make_folder(tmp_path / "run")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, range(4)))
    assert list((tmp_path / "run").iterdir()) == []


def test_every_command_says_what_is_wrong_with_a_run_file_it_cannot_read(tmp_path):
    """A rows.jsonl or env.json that is not UTF-8 text, or whose JSON is not an object, is bad input in one line
    (it was a UnicodeDecodeError, ValueError or AttributeError traceback)."""
    good = write_run(tmp_path / "good", measured(analytic(contexts=[256])), env={"device": "cpu"})
    rows, env = (good / "rows.jsonl").read_bytes(), (good / "env.json").read_bytes()
    cases = {
        "binary-rows": ({"rows.jsonl": b"\xff\xfe\x00rows\n"}, "rows.jsonl: not UTF-8 text"),
        "string-row": ({"rows.jsonl": b'"abc"\n' + rows}, 'rows.jsonl:1: not a JSON row, got "abc"'),
        "list-row": ({"rows.jsonl": b"[1, 2]\n" + rows}, "rows.jsonl:1: not a JSON row, got [1, 2]"),
        "binary-env": ({"rows.jsonl": rows, "env.json": b"\xff\xfe"}, "env.json: not UTF-8 text"),
        "list-env": ({"rows.jsonl": rows, "env.json": b"[]"}, "env.json: expected a JSON object, got []"),
    }
    for name, (files, why) in cases.items():
        run = tmp_path / name
        run.mkdir()
        for file, data in files.items():
            (run / file).write_bytes(data)
        one_line(run_main("table", str(run)), why)
        one_line(run_main("report", str(run), "--out", str(tmp_path / "r.html")), why)
        one_line(run_main("gate", str(good), str(run)), why)
    assert (good / "env.json").read_bytes() == env


def test_report_and_table_say_which_line_of_a_train_jsonl_is_no_training_row(tmp_path):
    """A train.jsonl line that is no training row (JSON of another kind, an object of other fields, bytes that are not
    UTF-8) is bad input in one line naming the file and line (report and table ended in a TypeError or KeyError
    traceback); a line cut short by a kill is left out, and a whole last row without its newline kept, as in rows.jsonl."""
    from hhbench.distill.train import read_train_rows

    row = {"variant": "head:3:1", "stage": 1, "step": 1, "tokens": 256, "loss": 1.5, "kind": "step", "status": "ok"}
    good = json.dumps(row).encode() + b"\n"
    cases = {
        "list": (good + b"[1]\n", "train.jsonl:2: not a JSON row, got [1]"),
        "string": (good + b'"abc"\n' + good, 'train.jsonl:2: not a JSON row, got "abc"'),
        "other-object": (good + b'{"a": 1}\n', 'train.jsonl:2: not a training row, got {"a": 1}'),
        "cut-inside": (good + b'{"variant": "he\n' + good, "train.jsonl:2: not a JSON row"),
        "binary": (b"\xff\xfe\x00train\n", "train.jsonl: not UTF-8 text"),
    }
    for name, (data, why) in cases.items():
        run = tmp_path / name
        run.mkdir()
        (run / "train.jsonl").write_bytes(data)
        one_line(run_main("table", str(run)), why)
        one_line(run_main("report", str(run), "--out", str(tmp_path / "r.html")), why)
    cut, unended = tmp_path / "cut" / "train.jsonl", tmp_path / "unended" / "train.jsonl"
    for path, data in (
        (cut, good + b'{"variant": "head:3:1", "st'),
        (unended, good + good.replace(b"1.5", b"1.25")[:-1]),
    ):
        path.parent.mkdir()
        path.write_bytes(data)
        assert run_main("table", str(path.parent)).returncode == 0
    assert [r["loss"] for r in read_train_rows(cut)] == [1.5]
    assert [r["loss"] for r in read_train_rows(unended)] == [1.25]  # the same step again: the last one counts
