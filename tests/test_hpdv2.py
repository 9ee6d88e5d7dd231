"""tools.hpdv2_benchmark: safe extraction, top-1 per prompt per style against an
independent computation, resume, styles, local and (simulated) hub layouts."""
import io
import json
import os
import shutil
import tarfile

import pytest
from PIL import Image

import tools.hpdv2_benchmark as tool
from rpo.data import hpdv2
from rpo.cli import UserError
from rpo.data.folders import ExpertDataset, PromptDataset
from rpo.data.safe_tar import safe_extract
from rpo.tiny.datasets import HPDV2_MODELS, HPDV2_STYLES, write_tiny_hpdv2


from fake_scorer import FakeScorer, Killed, fake_value  # noqa: E402


@pytest.fixture(autouse=True)
def fake_scorer(monkeypatch):
    FakeScorer.scored, FakeScorer.fail_after = 0, None
    monkeypatch.setattr(tool, "load_scorer", lambda name, **kw: FakeScorer())


@pytest.fixture(scope="module")
def hpd(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hpdv2"))
    write_tiny_hpdv2(path, seed=0)
    return path


def run_tool(*argv):
    return tool.main([*map(str, argv)])


def expected(repo, style):
    """Straight from the JSON and the tarballs: [(item name, prompt, model, jpeg bytes)]."""
    with open(os.path.join(repo, "benchmark", f"{style}.json")) as f:
        prompts = json.load(f)
    images = {}
    for model in HPDV2_MODELS:
        with tarfile.open(os.path.join(repo, "benchmark", "benchmark_imgs", f"{model}.tar.gz")) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith(f"{model}/{style}/"):
                    images[(model, int(os.path.basename(member.name)[:5]))] = tar.extractfile(member).read()
    digits = len(str(len(prompts) - 1))
    out = []
    for index, prompt in enumerate(prompts):
        best = min(HPDV2_MODELS, key=lambda m: (-fake_value(Image.open(io.BytesIO(images[(m, index)])), prompt), m))
        out.append((f"{index:0{digits}d}", prompt, best, images[(best, index)]))
    return out


def read_output(root):
    out = []
    for item in ExpertDataset(root, resolution=16).items:
        with open(item.image, "rb") as f:
            out.append((item.name, item.caption, os.path.splitext(os.path.basename(item.image))[0], f.read()))
    return out


def tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


# --------------------------------------------------------------------------- safe extraction
def make_tar(path, members):
    """members: [(TarInfo kwargs, data or None)]"""
    with tarfile.open(path, "w:gz") as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


@pytest.mark.parametrize("bad, why", [
    (dict(name="/tmp/evil-absolute.txt"), "absolute"),
    (dict(name="m/../../evil-dotdot.txt"), "'..'"),
    (dict(name="m/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "link"),
    (dict(name="m/escape", type=tarfile.SYMTYPE, linkname="../../.."), "link"),
    (dict(name="m/hard", type=tarfile.LNKTYPE, linkname="m/ok.txt"), "link"),
    (dict(name="m/device", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "regular file"),
    (dict(name="m/fifo", type=tarfile.FIFOTYPE), "regular file"),
])
def test_unsafe_tarball_is_refused_and_nothing_is_written(tmp_path, bad, why):
    archive = tmp_path / "evil.tar.gz"
    data = b"x" if bad.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else None
    make_tar(archive, [(dict(name="m/ok.txt"), b"fine"), (bad, data)])
    dest = tmp_path / "box" / "dest"
    before = set(os.listdir(tmp_path))
    with pytest.raises(UserError, match=f"refusing to extract .*{why}"):
        safe_extract(str(archive), str(dest))
    assert os.listdir(dest) == []  # checked before anything was written
    assert set(os.listdir(tmp_path)) == before | {"box"} and os.listdir(tmp_path / "box") == ["dest"]
    assert not os.path.exists("/tmp/evil-absolute.txt")


def test_safe_tarball_extracts_and_corrupt_one_is_a_clear_error(tmp_path):
    archive = tmp_path / "ok.tar.gz"
    make_tar(archive, [(dict(name="m", type=tarfile.DIRTYPE), None), (dict(name="m/a/b.txt"), b"hello")])
    safe_extract(str(archive), str(tmp_path / "d"))
    assert (tmp_path / "d" / "m" / "a" / "b.txt").read_bytes() == b"hello"
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[:20])
    with pytest.raises(UserError, match="cannot read archive"):
        safe_extract(str(tmp_path / "cut.tar.gz"), str(tmp_path / "e"))


def test_tool_refuses_a_malicious_model_tarball(hpd, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(hpd, repo)
    make_tar(repo / "benchmark" / "benchmark_imgs" / "sdv1.tar.gz",
             [(dict(name="sdv1/anime/00000.jpg"), b"x"), (dict(name="../../../pwned.txt"), b"x")])
    with pytest.raises(UserError, match="refusing to extract .*sdv1.tar.gz"):
        run_tool("--cache", tmp_path / "c", "--repo", repo, "--num_proc", 0, "--output", tmp_path / "o_{style}")
    assert not [p for p in tmp_path.rglob("pwned.txt")] and not (tmp_path.parent / "pwned.txt").exists()
    tag = hpdv2.Benchmark(str(repo), "").tag
    assert not os.path.exists(tmp_path / "c" / "hpdv2_benchmark" / tag / "images" / "sdv1")


# --------------------------------------------------------------------------- the tool
def test_top1_per_prompt_per_style_matches_independent_computation(hpd, tmp_path, capsys):
    run_tool("--cache", tmp_path / "cache", "--repo", hpd, "--batch_size", 5, "--num_proc", 0,
             "--output", tmp_path / "hpdv2_{style}")
    for style in HPDV2_STYLES:
        root = str(tmp_path / f"hpdv2_{style}")
        assert read_output(root) == expected(hpd, style)
        prompts = json.load(open(os.path.join(hpd, "benchmark", f"{style}.json")))
        assert [p["caption"] for p in PromptDataset(root)] == prompts  # duplicates kept, in order
    prompts = sum(len(json.load(open(os.path.join(hpd, "benchmark", f"{s}.json")))) for s in HPDV2_STYLES)
    assert FakeScorer.scored == len(HPDV2_MODELS) * prompts  # every model's image of every prompt, once
    assert "wrote 4 item(s)" in capsys.readouterr().out


def test_killed_run_resumes_to_the_same_output(hpd, tmp_path):
    run_tool("--cache", tmp_path / "c1", "--repo", hpd, "--batch_size", 4, "--num_proc", 0,
             "--output", tmp_path / "a_{style}")
    total = FakeScorer.scored
    FakeScorer.scored, FakeScorer.fail_after = 0, 5
    with pytest.raises(Killed):
        run_tool("--cache", tmp_path / "c2", "--repo", hpd, "--batch_size", 4, "--num_proc", 0,
                 "--output", tmp_path / "b_{style}")
    assert FakeScorer.scored == 20
    FakeScorer.scored, FakeScorer.fail_after = 0, None
    run_tool("--cache", tmp_path / "c2", "--repo", hpd, "--batch_size", 4, "--num_proc", 2,
             "--output", tmp_path / "b_{style}")
    assert FakeScorer.scored == total - 20  # extraction and the first 20 scores were reused
    for style in HPDV2_STYLES:
        assert tree(tmp_path / f"b_{style}") == tree(tmp_path / f"a_{style}")


def test_styles_subset_and_output_placeholder(hpd, tmp_path):
    run_tool("--cache", tmp_path / "c", "--repo", hpd, "--styles", "photo", "anime", "--num_proc", 0,
             "--output", tmp_path / "x_{style}")
    assert sorted(os.listdir(tmp_path)) == ["c", "x_anime", "x_photo"]
    with pytest.raises(UserError, match=r"must contain \{style\}"):
        run_tool("--cache", tmp_path / "c", "--repo", hpd, "--styles", "photo", "anime", "--output", tmp_path / "y")
    run_tool("--cache", tmp_path / "c", "--repo", hpd, "--styles", "photo", "--num_proc", 0, "--output", tmp_path / "y")
    assert tree(tmp_path / "y") == tree(tmp_path / "x_photo")
    with pytest.raises(SystemExit):
        run_tool("--styles", "cartoon")


def test_unpacked_local_layout_with_missing_and_corrupt_images(hpd, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(hpd, "benchmark"), repo / "benchmark", ignore=shutil.ignore_patterns("*.tar.gz"))
    for model in HPDV2_MODELS:  # as the paper's README's `tar -zxvf ... -C benchmark_imgs/` loop leaves them
        safe_extract(os.path.join(hpd, "benchmark", "benchmark_imgs", f"{model}.tar.gz"),
                     str(repo / "benchmark" / "benchmark_imgs"))
    want = expected(hpd, "anime")
    winner0, winner1 = want[0][2], want[1][2]
    os.remove(repo / "benchmark" / "benchmark_imgs" / winner0 / "anime" / "00000.jpg")
    (repo / "benchmark" / "benchmark_imgs" / winner1 / "anime" / "00001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    run_tool("--cache", tmp_path / "c", "--repo", repo, "--styles", "anime", "--num_proc", 0,
             "--output", tmp_path / "o")
    got = read_output(str(tmp_path / "o"))
    assert got[2:] == want[2:]
    assert got[0][2] != winner0 and got[1][2] != winner1  # the next best model instead
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "c" / "hpdv2_benchmark" / hpdv2.Benchmark(str(repo), "").tag / "images")


def test_hub_download_is_cached_and_tarballs_are_freed(hpd, tmp_path, monkeypatch):
    import huggingface_hub
    asked = []

    def fake_download(repo_id, filename, repo_type=None, local_dir=None, **kw):  # the hub, served from the tiny kit
        assert repo_id == "ymhao/HPDv2" and repo_type == "dataset"
        asked.append(filename)
        source = os.path.join(hpd, filename)
        if not os.path.exists(source):
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"404 {filename}")
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
        return target

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hpdv2, "MODELS", HPDV2_MODELS)
    run_tool("--cache", tmp_path / "c", "--num_proc", 0, "--output", tmp_path / "o_{style}")
    assert sorted(asked) == sorted([f"benchmark/{s}.json" for s in HPDV2_STYLES]
                                   + [f"benchmark/benchmark_imgs/{m}.tar.gz" for m in HPDV2_MODELS])
    work = tmp_path / "c" / "hpdv2_benchmark" / "ymhao--HPDv2"
    assert sorted(os.listdir(work / "images")) == sorted(HPDV2_MODELS)
    assert not list((work / "download").rglob("*.tar.gz"))  # freed once extracted
    for style in HPDV2_STYLES:
        assert read_output(str(tmp_path / f"o_{style}")) == expected(hpd, style)
    asked.clear()
    FakeScorer.scored = 0
    run_tool("--cache", tmp_path / "c", "--num_proc", 0, "--output", tmp_path / "o_{style}")
    assert asked == [] and FakeScorer.scored == 0
    monkeypatch.setattr(hpdv2, "MODELS", HPDV2_MODELS + ("NotAModel",))
    with pytest.raises(UserError, match="cannot download benchmark/benchmark_imgs/NotAModel.tar.gz"):
        run_tool("--cache", tmp_path / "c", "--num_proc", 0, "--output", tmp_path / "o_{style}")


def test_bad_repo_gives_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="--repo folder not found"):
        run_tool("--cache", tmp_path / "c", "--repo", tmp_path / "nope")
    with pytest.raises(UserError, match="--repo ymhao/HPDv2: cannot download benchmark/anime.json"):
        run_tool("--cache", tmp_path / "c")  # offline in the tests
    os.makedirs(tmp_path / "empty" / "benchmark")
    with pytest.raises(UserError, match="missing benchmark/anime.json"):
        run_tool("--cache", tmp_path / "c", "--repo", tmp_path / "empty")
    for style in HPDV2_STYLES:
        (tmp_path / "empty" / "benchmark" / f"{style}.json").write_text('["a prompt"]')
    with pytest.raises(UserError, match="no model images"):
        run_tool("--cache", tmp_path / "c", "--repo", tmp_path / "empty")


# --------------------------------------------------------------------------- with the real (tiny) scorers
def test_seed_command_runs_with_the_tiny_scorers(hpd, tmp_path, monkeypatch):
    from rpo.tiny.__main__ import KITS
    from rpo.scores import load_scorer

    monkeypatch.undo()
    weights = str(tmp_path / "weights")
    KITS["scorers"](weights, seed=0)
    tool.main(["--cache", str(tmp_path / "cache"), "--batch_size", "64", "--output", str(tmp_path / "hpdv2_{style}"),
               "--repo", hpd, "--weights_dir", weights, "--num_proc", "0"])
    scorer = load_scorer("pickscore", weights_dir=weights)
    for style in HPDV2_STYLES:
        items = ExpertDataset(str(tmp_path / f"hpdv2_{style}"), resolution=16).items
        assert len(items) == 4
        item = items[1]
        info = json.load(open(os.path.join(tmp_path, f"hpdv2_{style}", item.name, "info.json")))
        folder = os.path.join(tmp_path, "cache", "hpdv2_benchmark", hpdv2.Benchmark(hpd, "").tag, "images")
        candidates = [Image.open(os.path.join(folder, m, m, style, f"{int(item.name):05d}.jpg")).convert("RGB")
                      for m in HPDV2_MODELS]
        direct = scorer.score(candidates, [item.caption] * len(candidates))
        assert info["model"] == HPDV2_MODELS[int(direct.argmax())]
        assert info["score"] == pytest.approx(float(direct.max()), rel=1e-4, abs=1e-4)
