"""Prefect wrapper of the report stage: runs/<name>/report.md and its plots, published as artifacts.

Images in the Prefect UI: a markdown artifact's `![title](data:image/png;base64,...)` renders in both
UIs that Prefect 3.8.8 ships. The default one (ui-v2, React; server.ui.v2_enabled defaults to true)
renders markdown with react-markdown and rehype-sanitize, and its markdown component
(prefect/server/ui-v2/assets/lazy-markdown-*.js in the wheel) lets `data:image/` through for
`img src`, both in its urlTransform and in its sanitize schema (protocols.src gets "data"); the
older UI (prefect/server/ui, Vue) draws a markdown image token as a plain `<img src>`. A relative
link (report.md's `loss.png`) cannot work there: the browser has no way to the run directory.
create_image_artifact is not used: it needs a URL the browser can fetch, and ui-v2's image view
(ui-v2/src/components/artifacts/artifact/detail-image.tsx) prints that URL as a link under the
image, which for a data: URI would be a screenful of base64.
"""

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from leantune.report import inline_images, plot_files, png_data_uri, write_report
from tasks.stage import stage_task


@stage_task(name="report")
def report_run(run_dir: Path) -> Path:
    """Write the run report (leantune/report.py); publish it ("run-report") and each plot ("<plot>-plot")."""
    run_dir = Path(run_dir)
    path = write_report(run_dir)
    create_markdown_artifact(inline_images(path.read_text(), run_dir), key="run-report",
                             description=f"The run report of {run_dir.name} ({path}; plots as PNG files beside it)")
    for stem, title, png in plot_files(run_dir):
        create_markdown_artifact(f"## {title}\n\n![{title}]({png_data_uri(png)})\n", key=f"{stem}-plot",
                                 description=f"{title} of run {run_dir.name} ({png})")
    get_run_logger().info(f"report: {path}")
    return path
