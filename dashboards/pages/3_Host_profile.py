"""Host profile: the roofline's prediction against the real kernels on this machine, per op group."""

import streamlit as st

from perfsim import viz
from perfsim.dashboards import common
from perfsim.errors import UserError

st.set_page_config(page_title="Host profile · perfsim", layout="wide")
common.init_state()
st.title("Host profile")
model, formats, context = common.model_inputs()
common.sync_query_params()

uploaded = st.sidebar.file_uploader("Host profile JSON", type=["json"], key="host_json",
                                    help="the output of 'perfsim profile --device host --json'")
if uploaded is not None:
    try:
        common.parse_host_profile(uploaded.name, uploaded.getvalue())
    except UserError as e:
        st.error(f"Host profile refused: {e}")
        st.stop()
    st.session_state[common.HOST_WHERE], st.session_state[common.HOST_TEXT] = uploaded.name, uploaded.getvalue()

with st.expander("Measure on this machine (calibration, then a real decode of the sidebar's configuration)"):
    common.measure_host_panel(model, formats, context)

source = common.host_profile_source()
record, refusal = common.host_record(source)
if refusal:
    st.error(f"Host profile refused: {refusal}")
    st.stop()
if record is None:
    st.info(f"No host profile yet: upload the JSON of 'perfsim profile --device host --json' in the sidebar, "
            f"measure one above, or save one at {viz.default_host_profile_path()}.")
    st.stop()

st.caption(f"{viz.host_config_text(record)}; from {source[0]}")
predicted_column, measured_column, error_column = st.columns(3)
predicted_column.metric("Predicted decode tokens/s", f"{record['predicted']['decode_tokens_per_s']:.2f}")
measured_column.metric("Measured decode tokens/s", f"{record['measured']['decode_tokens_per_s']:.2f}")
error_column.metric("Error of tokens/s", f"{100 * record['error']['decode_tokens_per_s']:+.1f}%",
                    help="(predicted - measured) / measured: positive means the roofline promises more speed than the host delivers")
if host_state := viz.host_state_text(record):
    st.caption(host_state)
if memory_state := viz.memory_state_text(record):
    st.warning(memory_state)
st.plotly_chart(common.host_figure(*source), key="host_groups")
st.subheader("Per op group")
st.dataframe(viz.host_group_rows(record), hide_index=True, column_config={
    "predicted ms/token": st.column_config.NumberColumn(format="%.3f"),
    "measured ms/token": st.column_config.NumberColumn(format="%.3f"),
    "time error %": st.column_config.NumberColumn(format="%+.1f", help="100 x (predicted - measured) / measured time"),
})
