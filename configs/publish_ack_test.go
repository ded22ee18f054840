package configs

import (
	"strings"
	"testing"
)

func TestPublishAck(t *testing.T) {
	cfg, err := Load([]byte("protocol:\n  version: 2\n"), "ok.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Protocol.PublishAck != PublishAckLocal || !cfg.Protocol.PublishAckIsLocal() {
		t.Fatalf("default publish_ack = %q, want local", cfg.Protocol.PublishAck)
	}
	cfg, err = Load([]byte("protocol:\n  publish_ack: broker\n"), "ok.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Protocol.PublishAckIsLocal() {
		t.Fatal("publish_ack: broker reads as local")
	}
	_, err = Load([]byte("protocol:\n  version: 2\n  publish_ack: remote\n"), "bad.yaml")
	want := `bad.yaml:3: protocol.publish_ack: must be "local" or "broker", got "remote"`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v does not contain %q", err, want)
	}
}
