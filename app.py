"""LM Compression Lab: `streamlit run app.py`. Navigation over pages/ and the session defaults."""
import streamlit as st

from pages import common

st.set_page_config(page_title="LM Compression Lab", page_icon=":material/compress:", layout="wide")
common.init_session()

PAGES = [
    st.Page("pages/explore.py", title="Explore", icon=":material/tune:", default=True),
    st.Page("pages/tradeoffs.py", title="Trade-offs", icon=":material/scatter_plot:"),
    st.Page("pages/distillation.py", title="Distillation", icon=":material/thermostat:"),
    st.Page("pages/budget.py", title="Bit budget", icon=":material/grid_on:"),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
    st.Page("pages/report.py", title="Report", icon=":material/description:"),
    st.Page("pages/present.py", title="Presentation", icon=":material/slideshow:"),
]
# Each page draws the shared model sidebar itself (common.current_model): widgets created here, outside
# page.run(), cannot be driven by streamlit.testing's AppTest, and the Presentation page has no sidebar.
st.navigation(PAGES, position="top").run()
