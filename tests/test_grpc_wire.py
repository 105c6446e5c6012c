"""What grpc-go sees: UNIMPLEMENTED must come with a gRPC content-type.

grpcio accepts a trailers-only response without `content-type`, but grpc-go
(kubelet, csi-sanity) turns it into UNKNOWN ("malformed header: missing HTTP
content-type"). grpclib sends exactly that for methods it has no handler
for, so this test speaks raw HTTP/2 and checks the headers themselves.
"""

from __future__ import annotations

import socket

import h2.config
import h2.connection
import h2.events
import pytest

from e2e.driver import DriverProcess


def call_raw(socket_path: str, path: str) -> dict[str, str]:
    """One gRPC call (empty request message) over HTTP/2; all response headers."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [(":method", "POST"), (":scheme", "http"), (":path", path),
             (":authority", "localhost"), ("content-type", "application/grpc"),
             ("te", "trailers")],
        )  # fmt: skip
        conn.send_data(stream, b"\x00\x00\x00\x00\x00", end_stream=True)
        sock.sendall(conn.data_to_send())
        headers: dict[str, str] = {}
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers.update((k.decode(), v.decode()) for k, v in event.headers)
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            sock.sendall(conn.data_to_send())
    return headers


@pytest.mark.parametrize(
    "path",
    ["/csi.v1.Controller/CreateVolume", "/csi.v1.Node/NodeFutureMethod", "/x.Y/Z",
     "/csi.v1.Node/NodeStageVolume"],
)  # fmt: skip
def test_unknown_and_unimplemented_methods_answer_with_grpc_content_type(
    driver: DriverProcess, path: str
) -> None:
    headers = call_raw(str(driver.socket_path), path)
    assert headers.get(":status") == "200"
    assert headers.get("content-type", "").startswith("application/grpc")
    assert headers.get("grpc-status") == "12"
