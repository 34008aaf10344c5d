"""The job routes over HTTP on the tiny image pipeline (CPU): cancel is
`POST /jobs/{id}/cancel`; `DELETE /jobs/{id}` forgets a finished job and deletes its
files, and refuses one still running; `/ui` is documented as HTML."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import wait_ready, wait_until

BODY = {"prompt": "x", "width": 32, "height": 32, "steps": 2}
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def app_settings(make_settings, tiny_pipelines):
    return make_settings(
        generation={"image": {"pipeline": str(tiny_pipelines["image"]), "required_ram_mb": 64}}
    )


def test_cancel_is_a_post_and_delete_forgets_a_finished_job(app_settings, step_gate) -> None:
    with TestClient(create_app(app_settings)) as client:
        wait_ready(client)
        job_id = client.post("/generate-image", json=BODY, headers=ASYNC).json()["job_id"]
        step_gate.wait_held()
        # Running: DELETE refuses (409) and leaves it running; the cancel route cancels.
        r = client.delete(f"/jobs/{job_id}")
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "job_not_finished" and f"/jobs/{job_id}/cancel" in error["message"]
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
        r = client.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["job_id"] == job_id
        wait_until(
            lambda: client.get(f"/jobs/{job_id}").json()["status"] == "cancelled",
            what="the job cancelled",
        )
        # Finished: DELETE forgets it.
        assert client.delete(f"/jobs/{job_id}").status_code == 204
        assert client.get(f"/jobs/{job_id}").status_code == 404
        assert client.delete(f"/jobs/{job_id}").status_code == 404
        # A job that wrote files: DELETE removes them too.
        step_gate.release()
        done = client.post("/generate-image", json=BODY).json()
        assert done["status"] == "succeeded"
        url = done["outputs"][0]["url"]
        assert client.get(url).status_code == 200
        assert client.delete(f"/jobs/{done['job_id']}").status_code == 204
        assert client.get(url).status_code == 404
        assert client.post(f"/jobs/{done['job_id']}/cancel").status_code == 404


def test_the_openapi_document_says_what_the_job_routes_and_ui_answer(app_settings) -> None:
    with TestClient(create_app(app_settings)) as client:
        doc = client.get("/openapi.json").json()
        ui = doc["paths"]["/ui"]["get"]["responses"]["200"]["content"]
        assert list(ui) == ["text/html"]  # the page, not JSON
        assert client.get("/ui").headers["content-type"].startswith("text/html")
        cancel = doc["paths"]["/jobs/{job_id}/cancel"]["post"]["responses"]
        assert cancel["200"]["content"]["application/json"]["schema"]["$ref"].endswith("JobView")
        delete = doc["paths"]["/jobs/{job_id}"]["delete"]
        assert set(delete["responses"]) >= {"204", "404", "409"}
        assert "finished" in delete["summary"] and "cancel" in delete["description"]
