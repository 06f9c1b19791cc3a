"""Dashboard pages for models, planning runs and releases."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.decorators import viewer_required


@viewer_required
def model_list(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/model_list.html", {"models": []})


@viewer_required
def plan_list(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/plan_list.html", {"runs": []})


@viewer_required
def release_list(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/release_list.html", {"releases": []})
