"""Progress by the frame bytes on the socket (control.sent_marks)."""
from smsrepl.control import sent_marks
from smsrepl.control.sent_marks import SentMarks

MiB = 1 << 20


def test_values_move_between_marks_as_the_count_does_and_stop_at_the_last():
    on_socket = [1000]
    # a round from source offset 4 MiB; the channel had sent 1000 frame bytes before it
    marks = SentMarks(lambda: on_socket[0], (4 * MiB, 0), at=1000)
    marks.add(1000 + 4 * MiB, (12 * MiB, 4 * MiB))  # a 4 MiB frame taking the target to 12 MiB
    marks.add(1000 + 4 * MiB, (20 * MiB, 4 * MiB))  # then zeros to 20 MiB: no frame bytes of its own
    marks.add(1000 + 6 * MiB, (22 * MiB, 6 * MiB))
    assert marks.value() == (4 * MiB, 0)
    on_socket[0] = 1000 + MiB  # a quarter of the first frame
    assert marks.value() == (6 * MiB, MiB)
    on_socket[0] = 1000 + 4 * MiB  # the frame went: the zeros after it count too
    assert marks.value() == (20 * MiB, 4 * MiB)
    on_socket[0] = 1000 + 5 * MiB
    assert marks.value() == (21 * MiB, 5 * MiB)
    on_socket[0] = 1000 + 9 * MiB  # more than the marks (pings, another's frames): the last mark
    assert marks.value() == (22 * MiB, 6 * MiB)
    marks.add(1000 + 7 * MiB, (1, 1))  # values never go back
    on_socket[0] = 1000 + 10 * MiB
    assert marks.value() == (22 * MiB, 6 * MiB)


def test_beyond_the_last_mark_values_grow_byte_for_byte_when_asked_to():
    on_socket = [0]
    marks = SentMarks(lambda: on_socket[0], (0,), beyond=True)
    marks.add(100, (5000,))
    on_socket[0] = 150
    assert marks.value() == (5050,)


def test_marks_behind_the_socket_are_dropped_as_new_ones_come():
    on_socket = [0]
    marks = SentMarks(lambda: on_socket[0], (0,))
    for i in range(1, 10 * sent_marks.KEEP):
        on_socket[0] = i * 10 - 5
        marks.add(i * 10, (i,))
    assert len(marks._marks) <= sent_marks.KEEP + 1
    on_socket[0] = 10 * (10 * sent_marks.KEEP - 1)
    assert marks.value() == (10 * sent_marks.KEEP - 1,)

