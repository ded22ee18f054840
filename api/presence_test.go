package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// infoBackend adds the optional presence capabilities to the fake.
type infoBackend struct {
	*fakeBackend
	infos []string // "user info"
}

func (b *infoBackend) UpdateInfo(_ context.Context, user string, info json.RawMessage) (int, error) {
	b.infos = append(b.infos, user+" "+string(info))
	return 2, nil
}

func (b *infoBackend) UserChannels(_ context.Context, user string) ([]string, error) {
	if user == "nobody" {
		return nil, nil
	}
	return []string{"chat/a", "chat/b"}, nil
}

var (
	_ InfoUpdater   = (*infoBackend)(nil)
	_ UserChanneler = (*infoBackend)(nil)
)

// plainBackend hides the optional capabilities.
type plainBackend struct{ Backend }

func serve(t *testing.T, b Backend) *testServer {
	t.Helper()
	h, err := New(Config{Getenv: func(string) string { return testKey }}, b)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.StripPrefix(strings.TrimSuffix(Prefix, "/"), h))
	t.Cleanup(srv.Close)
	return &testServer{Server: srv, h: h}
}

func TestUpdateInfoAndUserChannels(t *testing.T) {
	b := &infoBackend{fakeBackend: &fakeBackend{}}
	s := serve(t, b)
	st, m := s.call(t, "update_info", `{"user":"42","info":{"status":"away"}}`)
	if st != 200 || m["sessions"] != 2.0 || len(b.infos) != 1 || b.infos[0] != `42 {"status":"away"}` {
		t.Fatalf("%d %v %v", st, m, b.infos)
	}
	for body, field := range map[string]string{
		`{"user":"42"}`:                 "info",
		`{"info":{}}`:                   "user",
		`{"user":"42","info":{},"x":1}`: "x",
		`{"user":"42","info":"` + strings.Repeat("a", MaxInfoLen) + `"}`: "info",
	} {
		st, m := s.call(t, "update_info", body)
		if c, f := errCode(m); st != 400 || c != CodeBadRequest || f != field {
			t.Errorf("%.40s: %d %v (want 400 naming %q)", body, st, m, field)
		}
	}
	st, m = s.call(t, "user_channels", `{"user":"42"}`)
	if st != 200 || len(m["channels"].([]any)) != 2 {
		t.Fatalf("%d %v", st, m)
	}
	st, m = s.call(t, "user_channels", `{"user":"nobody"}`)
	if st != 200 || m["channels"] == nil || len(m["channels"].([]any)) != 0 {
		t.Fatalf("no channels must be an empty list: %d %v", st, m)
	}

	p := serve(t, plainBackend{&fakeBackend{}})
	for _, method := range []string{"update_info", "user_channels"} {
		st, m := p.call(t, method, `{"user":"42","info":1}`)
		if method == "user_channels" {
			st, m = p.call(t, method, `{"user":"42"}`)
		}
		if c, _ := errCode(m); st != 501 || c != CodeNotSupported {
			t.Errorf("%s without the capability: %d %v", method, st, m)
		}
	}
}
