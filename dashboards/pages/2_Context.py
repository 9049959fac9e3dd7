"""Context: decode speed as the context grows, and where KV-cache bytes overtake weight bytes."""

import streamlit as st

from perfsim.dashboards import common

st.set_page_config(page_title="Context · perfsim", layout="wide")
common.init_state()
st.title("Context")
model, formats, context = common.model_inputs()
device_names = common.device_inputs()
common.sync_query_params()

if not device_names:
    st.info("Choose one or more devices in the sidebar.")
    st.stop()
crossover, crossover_text, speed_figure, bytes_figure = common.context_view(
    model.name, formats.weights.name, formats.kv_cache.name, context, tuple(device_names))
st.metric("KV cache overtakes weights at", f"{crossover.context:,} tokens" if crossover.context else "beyond the limit")
st.write(crossover_text)
st.plotly_chart(speed_figure, key="speed_vs_context")
st.plotly_chart(bytes_figure, key="bytes_vs_context")
