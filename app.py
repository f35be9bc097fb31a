"""LM Compression Lab: `streamlit run app.py`. Navigation over pages/ and the session defaults."""
from pathlib import Path

import streamlit as st

from pages import common
from pages.spans import span

# The tab icon is a file the app serves itself: a material-icon favicon is fetched from a web font host.
ICON = Path(__file__).resolve().parent / "assets" / "icon.png"
st.set_page_config(page_title="LM Compression Lab", page_icon=str(ICON), layout="wide")
common.let_abandoned_work_stop()   # a change made while this session computed: the old run stops first
# Streamlit's own Stop (top right) halts the script wherever it is and can leave a page half-drawn; each page's
# Stop button cancels cleanly and says what was kept, so it is the only one shown. While a script runs Streamlit
# shows its status widget: a previous result shown while a new one computes (containers keyed "previous-…") is
# dimmed only then, and a page's Stop button and progress bar (containers keyed "running-…") are hidden whenever
# no script runs, so a run halted some other way (a keyboard or menu path to Streamlit's stop) leaves no dead
# Stop button or frozen bar behind, and the previous result readable.
st.html("<style>[data-testid='stStatusWidget'] button {display: none !important;}"
        "body:has([data-testid='stStatusWidget']) [class*='st-key-previous-'] {opacity: 0.45; filter: grayscale(0.7);}"
        "body:not(:has([data-testid='stStatusWidget'])) [class*='st-key-running-'] {display: none !important;}"
        "*, *::before, *::after {transition: none !important;}"
        # a projector or a small laptop (1024 px): a narrower sidebar and page margins leave the charts (and the
        # seven page names in the top navigation) the width they need
        "@media (max-width: 1200px) {section[data-testid='stSidebar'] {width: 220px !important; min-width: 220px "
        "!important; max-width: 220px !important;} .block-container {padding-left: 1.5rem !important; "
        "padding-right: 1.5rem !important;}}"
        "</style>")
common.init_session()

# Names without icons: all seven fit the top navigation of a 1024 px projector (with icons three went to "more")
PAGES = [
    st.Page("pages/explore.py", title="Explore", default=True),
    st.Page("pages/tradeoffs.py", title="Trade-offs"),
    st.Page("pages/distillation.py", title="Distillation"),
    st.Page("pages/budget.py", title="Bit budget"),
    st.Page("pages/learn.py", title="Learn"),
    st.Page("pages/report.py", title="Report"),
    st.Page("pages/present.py", title="Present"),
]
# Each page draws the shared model sidebar itself (common.current_model): widgets created here, outside
# page.run(), cannot be driven by streamlit.testing's AppTest, and the Presentation page has no sidebar.
with span("script"):   # one rerun, as the server sees it (written only under LMCOMPRESS_SPANS)
    st.navigation(PAGES, position="top").run()
