"""Per-category panoptic-quality counts, as mmdet's pq_compute_single_core fills them and CocoPanopticMetric
averages them."""
from collections import defaultdict

VOID = 0                  # the segment id of unlabeled pixels
OFFSET = 256 * 256 * 256  # pairs (gt id, predicted id) are packed as gt * OFFSET + pred


class PQStatCat:
    """Sum of the IoUs of matched segments, and the counts of true positives, false positives, false negatives."""

    def __init__(self):
        self.iou, self.tp, self.fp, self.fn = 0.0, 0, 0, 0

    def __iadd__(self, other):
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class PQStat:

    def __init__(self):
        self.pq_per_cat = defaultdict(PQStatCat)

    def __getitem__(self, category_id):
        return self.pq_per_cat[category_id]

    def __iadd__(self, other):
        for category_id, stat in other.pq_per_cat.items():
            self.pq_per_cat[category_id] += stat
        return self

    def pq_average(self, categories: dict, isthing=None):
        """Mean PQ, SQ and RQ over the categories seen (things only, stuff only, or all with None), and each
        category's own."""
        totals, per_class, n = dict(pq=0.0, sq=0.0, rq=0.0), {}, 0
        for category_id, info in categories.items():
            if isthing is not None and bool(info['isthing']) != isthing:
                continue
            stat = self.pq_per_cat[category_id]
            if stat.tp + stat.fp + stat.fn == 0:
                per_class[category_id] = dict(pq=0.0, sq=0.0, rq=0.0)
                continue
            n += 1
            rq = stat.tp / (stat.tp + 0.5 * stat.fp + 0.5 * stat.fn)
            sq = stat.iou / stat.tp if stat.tp else 0.0
            per_class[category_id] = dict(pq=sq * rq, sq=sq, rq=rq)
            for key in totals:
                totals[key] += per_class[category_id][key]
        return dict({key: value / n if n else 0.0 for key, value in totals.items()}, n=n), per_class
