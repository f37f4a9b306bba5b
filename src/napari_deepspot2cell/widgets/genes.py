"""Gene browser: pick the gene painted on the cells, see its spread, inspect a cell.

The widget works on a prediction Labels layer (``metadata["deepspot2cell"]["adata"]``,
set by :func:`..widgets.layers.prediction_layers`); with several, a combo box picks
one. Choosing a gene repaints the expression Image layer in place (a new lookup
table, O(cells)); the list is a filtered Qt model view, so 20,000 genes stay
responsive. Up/Down step through the list (also from the search box).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from napari.layers import Labels, Points
from qtpy.QtCore import QEvent, QObject, QSortFilterProxyModel, QStringListModel, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListView,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..paint import robust_limits
from .layers import (
    META,
    UNCERTAINTY_PREFIX,
    cell_labels,
    decorate,
    find_adata,
    gene_values,
    paint_gene,
    update_gene,
)

__all__ = ["GeneBrowser"]

TOP_N = 10


def _info(layer) -> dict:
    info = getattr(layer, "metadata", {}).get(META)
    return info if isinstance(info, dict) else {}


class _StepKeys(QObject):
    """Up/Down typed in the search box step through the gene list."""

    def __init__(self, view: QListView):
        super().__init__(view)
        self._view = view

    def eventFilter(self, obj, event):  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.KeyPress and event.key() in (Qt.Key.Key_Up, Qt.Key.Key_Down):
            self._view.step(-1 if event.key() == Qt.Key.Key_Up else 1)
            return True
        return False


class _GeneList(QListView):
    def step(self, delta: int) -> None:
        model = self.model()
        if model is None or model.rowCount() == 0:
            return
        row = self.currentIndex().row()
        row = 0 if row < 0 else min(max(row + delta, 0), model.rowCount() - 1)
        self.setCurrentIndex(model.index(row, 0))


class GeneBrowser(QWidget):
    """Dock widget: gene list with search, uncertainty toggle, histogram, clicked cell's top genes."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._cells_layers: list = []
        self._row_index: tuple[int, pd.Index] | None = None  # (id(adata), label -> row)
        self.gene: str | None = None

        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("Prediction cells (Labels) layer to browse")
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search genes")
        self.search.setClearButtonEnabled(True)
        self.gene_model = QStringListModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.gene_model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.gene_list = _GeneList()
        self.gene_list.setModel(self.proxy)
        self.gene_list.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.gene_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.gene_list.setUniformItemSizes(True)  # constant-time layout for long lists
        self.search.installEventFilter(_StepKeys(self.gene_list))
        self.uncertainty = QCheckBox("show uncertainty")
        self.count_label = QLabel("")

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.0, 1.6), layout="constrained")
        self.hist_ax = self.figure.add_subplot(111)
        self.hist_canvas = FigureCanvasQTAgg(self.figure)
        self.hist_canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.hist_canvas.setFixedHeight(150)
        self.hist_draws = 0

        self.cell_title = QLabel("Top genes of the clicked cell")
        self.cell_table = QTableWidget(0, 3)
        self.cell_table.setHorizontalHeaderLabels(["gene", "value", "uncertainty"])
        self.cell_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.cell_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.cell_table.verticalHeader().setVisible(False)

        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        row.addWidget(QLabel("cells:"))
        row.addWidget(self.layer_combo, 1)
        layout.addLayout(row)
        layout.addWidget(self.search)
        layout.addWidget(self.gene_list, 1)
        row = QHBoxLayout()
        row.addWidget(self.uncertainty)
        row.addStretch(1)
        row.addWidget(self.count_label)
        layout.addLayout(row)
        layout.addWidget(self.hist_canvas)
        layout.addWidget(self.cell_title)
        layout.addWidget(self.cell_table)

        self.search.textChanged.connect(self._on_filter)
        self.layer_combo.currentIndexChanged.connect(self._on_layer_chosen)
        self.gene_list.selectionModel().currentChanged.connect(self._on_current_changed)
        self.uncertainty.toggled.connect(self._on_uncertainty)

        events = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            getattr(events, name).connect(self._refresh_layers)
        self.viewer.mouse_drag_callbacks.append(self._on_mouse_press)
        viewer, callback, refresh = self.viewer, self._on_mouse_press, self._refresh_layers
        self.destroyed.connect(lambda *_: _disconnect(viewer, callback, refresh))
        self._refresh_layers()

    # ------------------------------------------------------------ layers

    @property
    def cells_layer(self):
        i = self.layer_combo.currentIndex()
        return self._cells_layers[i] if 0 <= i < len(self._cells_layers) else None

    @property
    def adata(self):
        return find_adata(self.cells_layer)

    def _refresh_layers(self, event=None) -> None:
        current = self.cells_layer
        found = [ly for ly in self.viewer.layers if isinstance(ly, Labels) and find_adata(ly) is not None]
        if [id(x) for x in found] == [id(x) for x in self._cells_layers] and all(
            self.layer_combo.itemText(i) == ly.name for i, ly in enumerate(found)
        ):
            return
        self._cells_layers = found
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems([ly.name for ly in found])
        keep = next((i for i, ly in enumerate(found) if ly is current), 0 if found else -1)
        self.layer_combo.setCurrentIndex(keep)
        self.layer_combo.blockSignals(False)
        if self.cells_layer is not current:
            self._on_layer_chosen()

    def _find(self, kind: str):
        key = _info(self.cells_layer).get("key")
        if key is None:
            return None
        return next(
            (ly for ly in self.viewer.layers if _info(ly).get("key") == key and _info(ly).get("kind") == kind),
            None,
        )

    @property
    def image_layer(self):
        return self._find("expression")

    @property
    def uncertainty_layer(self):
        return self._find("uncertainty")

    def _on_layer_chosen(self, *_) -> None:
        adata = self.adata
        self._row_index = None
        self.cell_table.setRowCount(0)
        if adata is None:
            self.gene_model.setStringList([])
            self.gene = None
            self.count_label.setText("")
            self._draw_histogram(None)
            return
        genes = [str(g) for g in adata.var_names]
        self.gene_model.setStringList(genes)
        self.count_label.setText(f"{adata.n_obs:,} cells, {adata.n_vars:,} genes")
        has_unc = "uncertainty" in adata.layers
        self.uncertainty.setEnabled(has_unc)
        self.uncertainty.setToolTip("" if has_unc else "these predictions hold no uncertainty layer")
        gene = _info(self.cells_layer).get("gene") or (genes[0] if genes else None)
        self.gene = None
        if gene is not None:
            self.select_gene(gene)

    # ------------------------------------------------------------ genes

    def _on_filter(self, text: str) -> None:
        self.proxy.setFilterFixedString(text)
        if self.proxy.rowCount() and not self.gene_list.currentIndex().isValid():
            self.gene_list.setCurrentIndex(self.proxy.index(0, 0))

    def visible_genes(self) -> list[str]:
        return [self.proxy.index(i, 0).data() for i in range(self.proxy.rowCount())]

    def select_gene(self, gene: str) -> None:
        """Make ``gene`` current in the list (repaints through the selection signal)."""
        genes = self.gene_model.stringList()
        try:
            row = genes.index(gene)
        except ValueError:
            raise KeyError(f"gene {gene!r} is not in the list") from None
        index = self.proxy.mapFromSource(self.gene_model.index(row, 0))
        if not index.isValid():  # filtered out: clear the filter so the choice is visible
            self.search.clear()
            index = self.proxy.mapFromSource(self.gene_model.index(row, 0))
        if self.gene_list.currentIndex() == index:
            self.set_gene(gene)
        else:
            self.gene_list.setCurrentIndex(index)
        self.gene_list.scrollTo(index)

    def _on_current_changed(self, current, previous=None) -> None:
        if current.isValid():
            self.set_gene(str(current.data()))

    def set_gene(self, gene: str) -> None:
        """Repaint the expression (and uncertainty) layers, spots and histogram with ``gene``."""
        adata, cells = self.adata, self.cells_layer
        if adata is None or cells is None:
            return
        self.gene = gene
        image = self.image_layer
        if image is None:
            image = self._add_painted("expression", gene)
        update_gene(image, cells, adata, gene)
        if self.uncertainty.isChecked():
            self._show_uncertainty(gene)
        self._recolor_spots(gene)
        self._draw_histogram(gene_values(adata, gene))

    def _add_painted(self, kind: str, gene: str):
        """A painted Image layer for the chosen cells (the user deleted it, or uncertainty)."""
        cells, adata = self.cells_layer, self.adata
        levels = list(cells.data) if cells.multiscale else [cells.data]
        source = None if kind == "expression" else "uncertainty"
        painted, _, limits = paint_gene(adata, gene, levels, source)
        info = {"kind": kind, "key": _info(cells).get("key"), "gene": gene, "source": source or "X"}
        layer = self.viewer.add_image(
            painted if cells.multiscale else painted[0],
            multiscale=cells.multiscale,
            name=(UNCERTAINTY_PREFIX if source else "DeepSpot2Cell: ") + gene,
            colormap="viridis" if source else "magma",
            contrast_limits=limits,
            blending="translucent",
            scale=cells.scale,
            translate=cells.translate,
            metadata={META: info},
        )
        decorate(image_layer=layer, viewer=self.viewer)
        # keep the cells (outlines, hover readout) on top of the paint
        order = list(self.viewer.layers)
        self.viewer.layers.move(order.index(layer), order.index(cells))
        return layer

    def _on_uncertainty(self, checked: bool) -> None:
        if checked:
            if self.gene is not None:
                self._show_uncertainty(self.gene)
        else:
            layer = self.uncertainty_layer
            if layer is not None:
                self.viewer.layers.remove(layer)

    def _show_uncertainty(self, gene: str) -> None:
        adata = self.adata
        if adata is None or "uncertainty" not in adata.layers:
            return
        layer = self.uncertainty_layer
        if layer is None:
            self._add_painted("uncertainty", gene)
        else:
            update_gene(layer, self.cells_layer, adata, gene, layer="uncertainty")

    def _recolor_spots(self, gene: str) -> None:
        """Colour spots Points layers by the same gene's measured value (where they hold it)."""
        for layer in list(self.viewer.layers):
            info = _info(layer)
            if info.get("kind") != "spots" or not isinstance(layer, Points):
                continue
            feats = layer.features
            if gene not in feats:
                continue
            values = pd.to_numeric(feats[gene], errors="coerce").to_numpy(dtype=float)
            layer.face_colormap = "magma"
            layer.face_color = gene
            layer.face_color_mode = "colormap"
            layer.face_contrast_limits = robust_limits(values)
            diameter = info.get("spot_diameter", info.get("spot_diameter_px"))
            if diameter:
                layer.size = float(diameter)
            info["gene"] = gene

    # ------------------------------------------------------------ histogram

    def _draw_histogram(self, values) -> None:
        ax = self.hist_ax
        ax.clear()
        if values is not None:
            v = np.asarray(values, dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(v, bins=40, color="#b5367a")
            ax.set_title(self.gene or "", fontsize=8)
            ax.set_xlabel("predicted expression", fontsize=7)
        ax.tick_params(labelsize=7)
        self.hist_canvas.draw_idle()
        self.hist_draws += 1

    # ------------------------------------------------------------ clicked cell

    def _on_mouse_press(self, viewer, event) -> None:
        if event.type != "mouse_press":
            return
        cells = self.cells_layer
        if cells is None or not cells.visible:
            return
        value = cells.get_value(
            event.position,
            view_direction=getattr(event, "view_direction", None),
            dims_displayed=getattr(event, "dims_displayed", None),
            world=True,
        )
        if isinstance(value, tuple):  # multiscale: (data level, value)
            value = value[1]
        if value is None or int(value) == 0:
            return
        self.show_cell(int(value))

    def _row_of(self, label: int) -> int | None:
        adata = self.adata
        if self._row_index is None or self._row_index[0] != id(adata):
            self._row_index = (id(adata), pd.Index(cell_labels(adata)))
        rows = self._row_index[1].get_indexer([label])
        return None if rows[0] < 0 else int(rows[0])

    def show_cell(self, label: int) -> list[tuple[str, float]]:
        """Fill the table with the top predicted genes of cell ``label``; returns them."""
        adata = self.adata
        row = None if adata is None else self._row_of(label)
        if row is None:
            self.cell_title.setText(f"Cell {label}: not in the predictions")
            self.cell_table.setRowCount(0)
            return []
        x = adata.X[row]
        x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=float).ravel()
        unc = None
        if "uncertainty" in adata.layers:
            u = adata.layers["uncertainty"][row]
            unc = np.asarray(u.toarray() if hasattr(u, "toarray") else u, dtype=float).ravel()
        n = min(TOP_N, x.size)
        top = np.argpartition(-np.nan_to_num(x, nan=-np.inf), n - 1)[:n] if n else np.array([], int)
        top = top[np.argsort(-x[top], kind="stable")]
        genes = [str(g) for g in adata.var_names[top]]
        self.cell_table.setRowCount(n)
        for r, (j, g) in enumerate(zip(top, genes)):
            self.cell_table.setItem(r, 0, QTableWidgetItem(g))
            self.cell_table.setItem(r, 1, QTableWidgetItem(f"{x[j]:.3g}"))
            self.cell_table.setItem(r, 2, QTableWidgetItem("" if unc is None else f"{unc[j]:.3g}"))
        obs = adata.obs.iloc[row]
        where = f" at x={obs['x']:.0f}, y={obs['y']:.0f}" if "x" in obs and "y" in obs else ""
        self.cell_title.setText(f"Top genes of cell {label}{where}")
        self.clicked_cell = label
        return [(g, float(x[j])) for j, g in zip(top, genes)]


def _disconnect(viewer, callback, refresh) -> None:
    try:
        if callback in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.remove(callback)
        for name in ("inserted", "removed", "reordered"):
            getattr(viewer.layers.events, name).disconnect(refresh)
    except Exception:  # noqa: BLE001 - the viewer may already be gone
        pass
