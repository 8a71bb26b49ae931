"""Runs tab: the queue and history, and one run watched live (progress, loss, samples, log)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import jobs as jobs_api
from studio.errors import StudioError
from ui import runs_view as rv
from ui.common import Studio, friendly

LOG_EVENT_LINES = 30
LOG_WORKER_LINES = 30


def build(studio: Studio) -> SimpleNamespace:
    ws = studio.workspace

    with gr.Tab("3 · Runs", id="runs") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=6, min_width=400):
                pick = gr.Dropdown([], value=None, label="Run", info="Newest first", elem_id="runs-pick")
                table = gr.Dataframe(headers=rv.JOB_HEADERS, interactive=False, wrap=True, max_height=520,
                                     label="Queue and history — click a row to watch it",
                                     column_widths=["38%", "19%", "22%", "21%"], elem_id="runs-table")
            with gr.Column(scale=7):
                status = gr.HTML(rv.status_html(None, {}), elem_id="runs-status")
                with gr.Row():
                    cancel_btn = gr.Button("■ Cancel", variant="stop", interactive=False, elem_id="runs-cancel")
                    resume_btn = gr.Button("↻ Resume", interactive=False, elem_id="runs-resume")
                    open_btn = gr.Button("Open in Generate\u00a0→", variant="primary", interactive=False,
                                         elem_id="runs-open")
                plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss",
                                   height=250, color_map=rv.LOSS_COLOURS,
                                   x_title="step", y_title="loss", x_axis_format="~g", y_axis_format=".4~g",
                                   elem_id="runs-loss")
                samples = gr.Gallery(label="Samples (newest first)", columns=4, height=230, object_fit="contain",
                                     interactive=False, fit_columns=False, elem_id="runs-samples",
                                     elem_classes="captions-below")
                log_box = gr.Textbox(label="Log, newest first — the run's events, then the worker's output",
                                     lines=12, max_lines=12, interactive=False, autoscroll=False,
                                     elem_id="runs-log", elem_classes="mono")
        view = gr.State(rv.new_view(None))
        timer = gr.Timer(1.0, active=False)

    outputs = [pick, table, status, plot, samples, log_box, cancel_btn, resume_btn, open_btn, view]

    # The run each page (session) switched to last. A timer tick sends the page's values as they
    # were when it fired: one that ran while the page switched runs is dropped, or its outputs,
    # arriving last, would bring the run shown before back.
    switched_to: dict[str, str | None] = {}

    def refresh(run_id: str | None, current: dict | None, *, force: bool = False, session: str | None = None):
        jobs = jobs_api.list_jobs(ws)
        ids = [j.id for j in jobs]
        run_id = rv.shown_run(jobs, run_id)
        if not current or current.get("run") != run_id:
            current, force = rv.new_view(run_id), True
            if session is not None:
                switched_to[session] = run_id
        job = next((j for j in jobs if j.id == run_id), None)
        run_dir = ws.run_dir(job.id) if job else None
        if run_dir is not None:
            rv.tail_events(current, run_dir)

        def changed(key: str, value) -> bool:
            if force or current.get(key) != value:
                current[key] = value
                return True
            return False

        out_pick = gr.update(choices=ids, value=run_id) if changed("shown_ids", ids) else gr.skip()
        rows = rv.job_rows(jobs)
        out_table = rows if changed("shown_rows", rows) else gr.skip()
        position = None
        if job is not None and job.state == "queued":
            position = sum(1 for j in jobs if j.state in ("running", "cancelling")
                           or (j.state == "queued" and j.created < job.created))
        html_text = rv.status_html(job, current, queue_position=position)
        out_status = html_text if changed("shown_status", html_text) else gr.skip()
        out_plot = (gr.update(value=rv.loss_chart(current["points"]), title=rv.loss_title(current["points"]))
                    if changed("shown_points", len(current["points"])) else gr.skip())
        sample_list = [tuple(s) for s in current["samples"] if Path(s[0]).is_file()]
        out_samples = list(reversed(sample_list)) if changed("shown_samples", len(sample_list)) else gr.skip()
        worker = rv.tail_text(run_dir / jobs_api.WORKER_LOG, max_lines=LOG_WORKER_LINES) if run_dir else ""
        log_text = rv.run_log(current["lines"][-LOG_EVENT_LINES:], worker)
        out_log = log_text if changed("shown_log", log_text) else gr.skip()
        state = job.state if job else None
        adapter_ok = bool(job and job.state == "done" and job.adapter and Path(job.adapter).is_file())
        buttons = (state, adapter_ok, bool(job and jobs_api.can_resume(job)))
        if changed("shown_buttons", buttons):
            out_buttons = [gr.update(interactive=state in ("queued", "running")),
                           gr.update(interactive=bool(job and jobs_api.can_resume(job))),
                           gr.update(interactive=adapter_ok)]
        else:
            out_buttons = [gr.skip()] * 3
        return [out_pick, out_table, out_status, out_plot, out_samples, out_log, *out_buttons, current]

    @friendly
    def on_tick(run_id, current, request: gr.Request):
        session = request.session_hash
        stale = lambda: switched_to.get(session, run_id) != run_id  # noqa: E731
        if stale():
            return [gr.skip()] * len(outputs)
        shown = refresh(run_id, current, session=session)
        return [gr.skip()] * len(outputs) if stale() else shown

    @friendly
    def show(run_id, current, request: gr.Request):
        """The run `run_id` (else the one training, else the newest), drawn anew."""
        return refresh(run_id, current, force=True, session=request.session_hash)

    @friendly
    def on_row(current, evt: gr.SelectData, request: gr.Request):
        row = getattr(evt, "row_value", None)
        return show(row[0] if row else None, current, request)

    @friendly
    def on_cancel(run_id, current):
        if not run_id:
            raise StudioError("Pick a run first.")
        job = jobs_api.cancel(ws, run_id)
        gr.Info("Cancelled." if job.state == "cancelled" else "Stopping after the current step; a checkpoint "
                "is saved so you can resume.")
        return refresh(run_id, current)

    @friendly
    def on_resume(run_id, current):
        if not run_id:
            raise StudioError("Pick a run first.")
        jobs_api.resume(ws, run_id)  # also makes sure a supervisor runs
        gr.Info("Queued again; it continues from its last checkpoint.")
        return refresh(run_id, current)

    def adapter_of(run_id: str | None) -> str:
        if not run_id:
            raise StudioError("Pick a finished run first.")
        job = jobs_api.get_job(ws, run_id)
        if job.state != "done" or not job.adapter:
            raise StudioError(f"Run {run_id} is {job.state}; only a finished run has an adapter.")
        path = Path(job.adapter)
        if not path.is_file():
            raise StudioError(f"The adapter {path.name} of run {run_id} is no longer in the library.")
        return path.stem

    timer.tick(on_tick, [pick, view], outputs, show_progress="hidden", trigger_mode="once")
    pick.input(show, [pick, view], outputs, show_progress="hidden")
    table.select(on_row, view, outputs, show_progress="hidden")
    cancel_btn.click(on_cancel, [pick, view], outputs)
    resume_btn.click(on_resume, [pick, view], outputs)

    return SimpleNamespace(tab=tab, pick=pick, view=view, timer=timer, outputs=outputs, open_btn=open_btn,
                           show=show, adapter_of=adapter_of)
