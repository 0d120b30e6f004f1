# The ECR API's GetAuthorizationToken (awsJson1.1) for the many-core bundle, where moto is not to
# be had: one fixed Basic token for user AWS, valid 12 hours, as ECR answers. Logs one line per
# call to stderr, so the run can count token calls. Loopback only.
import base64, http.server, json, sys, time

PASSWORD = sys.argv[2] if len(sys.argv) > 2 else "123456789012-auth-token"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        token = base64.b64encode(f"AWS:{PASSWORD}".encode()).decode()
        body = json.dumps({"authorizationData": [{
            "authorizationToken": token,
            "expiresAt": time.time() + 43200,
            "proxyEndpoint": "https://123456789012.dkr.ecr.us-east-1.amazonaws.com",
        }]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        sys.stderr.write("token call\n")
        sys.stderr.flush()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
