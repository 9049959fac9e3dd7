"""The Streamlit dashboard (installed as perfsim.dashboards): `streamlit run MAIN_PAGE`, or `perfsim dashboard`.

A Streamlit multipage app in its plainest form: the entry script is the Roofline page, and every script
in pages/ is another page (named after its file, in the order of its number)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
MAIN_PAGE = str(HERE / "Roofline.py")
PAGE_FILES = {  # page title -> script
    "Roofline": HERE / "Roofline.py",
    "Devices": HERE / "pages" / "1_Devices.py",
    "Context": HERE / "pages" / "2_Context.py",
    "Host profile": HERE / "pages" / "3_Host_profile.py",
}
