"""`builder docs`: the mkdocs-material site builds strictly, offline, with the CLI reference and the card."""

from click.testing import CliRunner

from builder.cli import main

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def test_docs_build_strictly_with_cli_reference_and_the_given_card(tmp_path):
    card = tmp_path / "card" / "README.md"
    card.parent.mkdir()
    card.write_text("---\nlicense: apache-2.0\n---\n\n# Supermix v9\n\n![Training loss against step](loss_curve.png)\n")
    (card.parent / "loss_curve.png").write_bytes(PNG)
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["docs", "--out", str(out), "--card", str(card)])
    assert result.exit_code == 0, result.output
    cli = (out / "cli.html").read_text()
    assert "builder pretrain" in cli and "supermix serve" in cli and "builder models" in cli
    assert "Supermix v9" in (out / "model-card.html").read_text() and (out / "loss_curve.png").read_bytes() == PNG
    for page in ("index", "pipeline", "data", "training", "registry", "export", "runtime", "site", "benchmarks",
                 "decisions"):
        assert (out / f"{page}.html").is_file(), page
    html = "".join(p.read_text() for p in out.glob("*.html"))
    assert "fonts.googleapis" not in html and 'src="http' not in html  # nothing fetched from the network


def test_a_broken_page_fails_with_mkdocs_message(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# card\n\n[broken](missing-page.md)\n")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "old.html").write_text("kept")
    result = CliRunner().invoke(main, ["docs", "--out", str(tmp_path / "site"), "--card", str(card)])
    assert result.exit_code == 1 and "missing-page.md" in result.output and "Traceback" not in result.output
    assert (tmp_path / "site" / "old.html").read_text() == "kept"  # the previous site is left as it was
