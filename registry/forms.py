from __future__ import annotations

from typing import Any

from django import forms

from devices.models import DeviceProfile
from planner.recommend import POLICY_KINDS
from registry.models import BaseModel, PlanningRun


class PlanningRunForm(forms.Form):
    base_model = forms.ModelChoiceField(
        queryset=BaseModel.objects.filter(kind=BaseModel.Kind.RUNNABLE), label="Model"
    )
    device_profiles = forms.ModelMultipleChoiceField(
        queryset=DeviceProfile.objects.order_by("name"), widget=forms.CheckboxSelectMultiple, label="Devices"
    )
    policy_kind = forms.ChoiceField(choices=list(POLICY_KINDS.items()), label="Policy")
    latency_slo_ms = forms.FloatField(required=False, label="Latency SLO (ms)")
    max_loss_points = forms.FloatField(required=False, label="Max accuracy loss (points)")
    trials_per_device = forms.IntegerField(initial=150, min_value=1, label="Trials per device")
    real_eval_budget = forms.IntegerField(initial=12, min_value=1, label="Real evaluations")
    sampler = forms.ChoiceField(choices=PlanningRun.Sampler.choices, initial=PlanningRun.Sampler.NSGA2)

    def run_kwargs(self) -> dict[str, Any]:
        data = self.cleaned_data
        policy: dict[str, Any] = {"kind": data["policy_kind"]}
        if data.get("latency_slo_ms") is not None:
            policy["latency_slo_ms"] = data["latency_slo_ms"]
        if data.get("max_loss_points") is not None:
            policy["max_loss_points"] = data["max_loss_points"]
        return {
            "base_model": data["base_model"],
            "device_profiles": list(data["device_profiles"]),
            "policy": policy,
            "trials_per_device": data["trials_per_device"],
            "real_eval_budget": data["real_eval_budget"],
            "sampler": data["sampler"],
        }
