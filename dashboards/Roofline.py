"""Roofline: the roofs of the chosen devices, and the decode ops of the chosen model placed on them."""

import streamlit as st

from perfsim.dashboards import common

st.set_page_config(page_title="Roofline · perfsim", layout="wide")
common.init_state()
st.title("Roofline")
model, formats, context = common.model_inputs()
device_names = common.device_inputs()
all_units = common.all_units_input("Roofs of every compute unit")
uploaded = common.uploaded_device_yaml()
common.sync_query_params()

host_source = common.host_profile_source()
host_record, host_refusal = common.host_record(host_source)
if host_refusal:
    st.warning(f"Host profile not shown: {host_refusal}")

if not device_names and not uploaded:
    st.info("Choose one or more devices in the sidebar.")
    st.stop()
figure, points, refused = common.roofline_view(model.name, formats.weights.name, formats.kv_cache.name, context,
                                      tuple(device_names), uploaded, host_source if host_record else None, all_units)
st.plotly_chart(figure, key="roofline")
for reason in refused:
    st.warning(f"Left out: {reason}")
st.caption("Lines: achievable roofs (memory slope = achievable bandwidth; flat = peak TFLOP/s x compute efficiency; "
           "solid f32, dashed f16, dotted int8; a precision a unit does not list runs on the next one's roof). Points: decode ops at each device's default unit, "
           "y = FLOPs / predicted time (overhead included). Circle: memory-bound, square: compute-bound, x: overhead-bound."
           + (" Diamonds: the host profile's predicted (open) and measured (filled) ops." if host_record else ""))
with st.expander("Op points"):
    st.dataframe(points, hide_index=True)
