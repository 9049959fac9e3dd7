"""Devices: the chosen model's predicted decode speed, TTFT and memory on every device profile."""

import streamlit as st

from perfsim.dashboards import common

st.set_page_config(page_title="Devices · perfsim", layout="wide")
common.init_state()
st.title("Devices")
model, formats, context = common.model_inputs()
all_units = common.all_units_input("Every compute unit (not only the default)")
uploaded = common.uploaded_device_yaml()
common.sync_query_params()

rows, refused, speed_figure, memory_figure = common.devices_view(
    model.name, formats.weights.name, formats.kv_cache.name, context, uploaded, all_units)
st.plotly_chart(speed_figure, key="speed")
st.caption("Black markers: published measurements of this model on that device "
           "(triangle right: 'more than', triangle left: 'less than', diamond: 'about' or exact).")
st.plotly_chart(memory_figure, key="memory")
st.subheader("Predictions")
st.dataframe(rows, hide_index=True, column_config={
    "decode tokens/s": st.column_config.NumberColumn(format="%.2f"),
    "ms/token": st.column_config.NumberColumn(format="%.2f"),
    "TTFT ms": st.column_config.NumberColumn(format="%.1f"),
    "memory GB": st.column_config.NumberColumn(format="%.2f"),
    "usable GB": st.column_config.NumberColumn(format="%.1f"),
    "predicted vs published %": st.column_config.NumberColumn(format="%+.1f"),
})
for reason in refused:
    st.warning(f"Left out: {reason}")
