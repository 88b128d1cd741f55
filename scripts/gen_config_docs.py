"""Write docs/configuration.md from the ExportConfiguration schema and the format registry."""

from pathlib import Path

from model_export.pipeline.validate import configuration_markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    target.write_text(configuration_markdown(), encoding="utf-8")
    print(f"wrote {target}")
