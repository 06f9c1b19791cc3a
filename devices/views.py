"""Dashboard pages for device profiles (server-rendered; charts arrive as Plotly JSON)."""

from __future__ import annotations

from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.decorators import viewer_required
from devices.models import DeviceProfile
from devices.validation import FORMATS, KINDS, LIMITS, SOURCED_FIELDS

SORTABLE = {
    "name": "name",
    "vendor": "vendor",
    "kind": "kind",
    "ram": "ram_total_bytes",
    "budget": "ram_budget_bytes",
    "bandwidth": "bandwidth_gbs",
    "int8": "int8_tops",
    "fp16": "fp16_tflops",
    "share": "fleet_share",
}


_COLUMNS = [
    ("name", "Name"),
    ("vendor", "Vendor"),
    ("kind", "Kind"),
    ("ram", "RAM (GiB)"),
    ("budget", "Budget (GiB)"),
    ("bandwidth", "Bandwidth (GB/s)"),
    ("int8", "int8 (TOPS)"),
    ("fp16", "fp16 (TFLOPS)"),
    ("share", "Fleet share"),
]


def _columns(request: HttpRequest, sort: str) -> list[dict[str, str]]:
    """Header links: clicking a column sorts by it; clicking it again reverses the order."""
    columns = []
    for key, label in _COLUMNS:
        params = request.GET.copy()
        params["sort"] = f"-{key}" if sort == key else key
        arrow = " ▲" if sort == key else (" ▼" if sort == f"-{key}" else "")
        columns.append({"key": key, "label": label + arrow, "href": "?" + params.urlencode()})
    return columns


@viewer_required
def device_list(request: HttpRequest) -> HttpResponse:
    """Sortable, filterable list. Unknown filter values fall back to 'all' with a notice."""
    notices: list[str] = []
    profiles = DeviceProfile.objects.all()
    q = request.GET.get("q", "")
    if "\x00" in q:
        # PostgreSQL text cannot hold NUL: passed into the lookup it was a 500 there.
        notices.append("Search: NUL characters removed.")
        q = q.replace("\x00", "")
    q = q.strip()[:100]
    if q:
        profiles = profiles.filter(Q(name__icontains=q) | Q(vendor__icontains=q) | Q(soc__icontains=q))
    kind = request.GET.get("kind", "")
    if kind and kind not in KINDS:
        notices.append(f"Unknown kind {kind!r}: showing every kind.")
        kind = ""
    if kind:
        profiles = profiles.filter(kind=kind)
    fmt = request.GET.get("format", "")
    if fmt and fmt not in FORMATS:
        notices.append(f"Unknown format {fmt!r}: showing every format.")
        fmt = ""
    if fmt:
        profiles = profiles.filter(weight_formats__icontains=f'"{fmt}"')
    sort = request.GET.get("sort", "name")
    if sort.lstrip("-") not in SORTABLE:
        notices.append(f"Cannot sort by {sort!r}: sorted by name.")
        sort = "name"
    field = SORTABLE[sort.lstrip("-")]
    profiles = profiles.order_by(f"-{field}" if sort.startswith("-") else field, "name")
    return render(
        request,
        "dashboard/device_list.html",
        {
            "profiles": profiles,
            "notices": notices,
            "q": q,
            "kind": kind,
            "format": fmt,
            "sort": sort,
            "kinds": KINDS,
            "formats": FORMATS,
            "columns": _columns(request, sort),
        },
    )


def profile_rows(profile: DeviceProfile) -> list[dict[str, str]]:
    """Each sourced figure of a profile with its unit and source, for the device page (which
    lives in `registry.pages`: it also shows the registry's recommendations)."""
    rows = []
    for field in SOURCED_FIELDS:
        value = getattr(profile, field)
        unit = LIMITS[field][2]
        if value is None:
            shown = "—"
        elif unit == "bytes":
            shown = f"{value / 1024**3:.2f} GiB ({value:,} bytes)"
        else:
            shown = f"{value:g} {unit}"
        rows.append(
            {
                "field": field,
                "label": str(getattr(DeviceProfile._meta.get_field(field), "verbose_name", field)),
                "value": shown,
                "source": profile.sources.get(field, ""),
            }
        )
    return rows
