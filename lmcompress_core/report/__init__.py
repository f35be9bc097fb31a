"""Report: what people see — pure plotly figure builders, the offline HTML report, the Learn page's computations.
None of it imports streamlit; the pages call these and display the result.
"""
