"""The look of HEFT Studio: the Gradio theme and the CSS of cards, notes and the side panel (given to launch())."""
from __future__ import annotations

import gradio as gr

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate")
CSS = """
.heft-header h1 { margin-bottom: 0; }
.heft-note { font-size: 0.9em; opacity: 0.85; }
.heft-pad { padding: 6px 10px; }
.heft-side { position: sticky; top: 8px; align-self: flex-start; }
.heft-msg-error { border-left: 4px solid #dc2626; padding-left: 8px; }
.heft-cards { display: flex; gap: 12px; flex-wrap: wrap; }
.heft-card { flex: 1 1 180px; border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 12px 14px;
             background: var(--background-fill-secondary); min-width: 170px; }
.heft-card.heft-right { border-color: #16a34a; box-shadow: inset 0 3px 0 #16a34a; }
.heft-card.heft-wrong { border-color: #dc2626; box-shadow: inset 0 3px 0 #dc2626; }
.heft-card-title { font-weight: 700; font-size: 1.05em; }
.heft-card-sub { font-size: 0.8em; opacity: 0.7; min-height: 1.2em; overflow: hidden; text-overflow: ellipsis;
                 white-space: nowrap; }
.heft-answer { font-size: 1.8em; font-weight: 700; margin: 6px 0 4px; text-transform: uppercase; }
.heft-mark { font-size: 0.8em; }
.heft-right .heft-mark { color: #16a34a; } .heft-wrong .heft-mark { color: #dc2626; }
.heft-bar { height: 6px; background: var(--border-color-primary); border-radius: 3px; overflow: hidden; }
.heft-bar > div { height: 100%; background: var(--color-accent); }
.heft-meta { font-size: 0.85em; margin-top: 6px; opacity: 0.85; }
.heft-card-error { color: #b45309; font-size: 0.9em; }
.heft-msg:not(:has(p, li, table)) { display: none !important; }  /* field messages: shown when not empty */
.heft-card.heft-pending { opacity: 0.65; border-style: dashed; }
.heft-card-wait { font-size: 1.1em; margin: 10px 0 4px; opacity: 0.8; }
.heft-gold { margin-top: 10px; }
.heft-cards-empty { opacity: 0.6; padding: 12px; }
#heft-estimate table { font-size: 0.9em; }
#heft-estimate th, #heft-estimate td { padding: 4px 6px; white-space: nowrap; }
.heft-log textarea { font-family: var(--font-mono); font-size: 12px !important; }
"""
