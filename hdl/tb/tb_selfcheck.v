// Self-checking test bench for plain Icarus users (no Python):
//   iverilog -g2005 -I hdl/tb -o tb.vvp -s tb_selfcheck hdl/src/*.v hdl/tb/tb_selfcheck.v
//   vvp -n tb.vvp            (prints PASS, or FAIL lines and exits with status 1)
// For every n in 2..16: pseudo-random n-bit values (with -2^(n-1) and 2^(n-1)-1), chosen
// exactly representable in bfloat16, are packed, sent upstream with scale 1.0, and the
// bfloat16 results are sent back downstream with inverse scale 1.0: the packed words must come
// back unchanged, with tlast on the last beat, no error flag, and one value per lane per cycle
// (ready held high); a second pass repeats it with random back-pressure on every sink and
// random gaps in every source.
`default_nettype none
module tb_selfcheck;
    localparam LANES = 2;
    localparam V = 53;                   // values per lane and per width
    localparam W = 16 * LANES;
    localparam MAXW = V;                 // words per lane <= values per lane

    reg clk = 1'b0, rst = 1'b1;
    always #5 clk = ~clk;

    reg  [7:0]  s_axil_awaddr = 0, s_axil_araddr = 0;
    reg         s_axil_awvalid = 0, s_axil_wvalid = 0, s_axil_bready = 0, s_axil_arvalid = 0;
    reg         s_axil_rready = 0;
    reg  [31:0] s_axil_wdata = 0;
    reg  [3:0]  s_axil_wstrb = 0;
    wire        s_axil_awready, s_axil_wready, s_axil_bvalid, s_axil_arready, s_axil_rvalid;
    wire [1:0]  s_axil_bresp, s_axil_rresp;
    wire [31:0] s_axil_rdata;
    reg  [W-1:0] s_up_tdata = 0, s_dn_tdata = 0;
    reg          s_up_tvalid = 0, s_up_tlast = 0, s_dn_tvalid = 0, s_dn_tlast = 0;
    reg          m_up_tready = 0, m_dn_tready = 0;
    wire         s_up_tready, s_dn_tready, m_up_tvalid, m_up_tlast, m_dn_tvalid, m_dn_tlast;
    wire [W-1:0] m_up_tdata, m_dn_tdata;

    nc_top #(.LANES(LANES)) dut (
        .clk(clk), .rst(rst),
        .s_axil_awaddr(s_axil_awaddr), .s_axil_awvalid(s_axil_awvalid),
        .s_axil_awready(s_axil_awready), .s_axil_wdata(s_axil_wdata),
        .s_axil_wstrb(s_axil_wstrb), .s_axil_wvalid(s_axil_wvalid), .s_axil_wready(s_axil_wready),
        .s_axil_bresp(s_axil_bresp), .s_axil_bvalid(s_axil_bvalid), .s_axil_bready(s_axil_bready),
        .s_axil_araddr(s_axil_araddr), .s_axil_arvalid(s_axil_arvalid),
        .s_axil_arready(s_axil_arready), .s_axil_rdata(s_axil_rdata),
        .s_axil_rresp(s_axil_rresp), .s_axil_rvalid(s_axil_rvalid), .s_axil_rready(s_axil_rready),
        .s_up_axis_tdata(s_up_tdata), .s_up_axis_tvalid(s_up_tvalid),
        .s_up_axis_tlast(s_up_tlast), .s_up_axis_tready(s_up_tready),
        .m_up_axis_tdata(m_up_tdata), .m_up_axis_tvalid(m_up_tvalid),
        .m_up_axis_tlast(m_up_tlast), .m_up_axis_tready(m_up_tready),
        .s_dn_axis_tdata(s_dn_tdata), .s_dn_axis_tvalid(s_dn_tvalid),
        .s_dn_axis_tlast(s_dn_tlast), .s_dn_axis_tready(s_dn_tready),
        .m_dn_axis_tdata(m_dn_tdata), .m_dn_axis_tvalid(m_dn_tvalid),
        .m_dn_axis_tlast(m_dn_tlast), .m_dn_axis_tready(m_dn_tready));

`include "nc_axil_tasks.vh"

    reg [W-1:0] words [0:MAXW-1];        // packed input, lane i in bits 16i+15..16i
    reg [W-1:0] bfs [0:V-1];             // upstream output
    reg [W-1:0] back [0:MAXW-1];         // downstream output
    reg [16*V+15:0] bits [0:LANES-1];    // bit stream per lane while packing
    integer n, nwords, lane, j, b, errors, up_sent, up_got, dn_sent, dn_got, ready_pct, pass;
    integer valid_pct;
    integer seed, cyc, up_lasts, dn_lasts;
    reg up_run, dn_run;
    reg up_hold = 1'b0, dn_hold = 1'b0;
    reg [31:0] rd, rnd;
    reg [15:0] v;

    // a value exactly representable in bfloat16: keep the 8 leading bits of |v|
    function [15:0] exact(input [15:0] x);
        reg [15:0] mag;
        integer k, msb;
        begin
            mag = x[15] ? (~x + 16'd1) : x;
            msb = 0;
            for (k = 0; k < 16; k = k + 1) if (mag[k]) msb = k;
            if (msb > 7) mag = mag & ~((16'd1 << (msb - 7)) - 16'd1);
            exact = x[15] ? (~mag + 16'd1) : mag;
        end
    endfunction

    always @(negedge clk) begin
        // AXI-Stream: a beat once offered stays offered until taken
        s_up_tvalid = up_run && (up_sent < nwords) && (up_hold || ($unsigned($random(seed)) % 100 < valid_pct));
        s_up_tdata = (up_sent < nwords) ? words[up_sent] : {W{1'b0}};
        s_up_tlast = (up_sent == nwords - 1);
        s_dn_tvalid = dn_run && (dn_sent < V) && (dn_hold || ($unsigned($random(seed)) % 100 < valid_pct));
        s_dn_tdata = (dn_sent < V) ? bfs[dn_sent] : {W{1'b0}};
        s_dn_tlast = (dn_sent == V - 1);
        m_up_tready = ($unsigned($random(seed)) % 100) < ready_pct;
        m_dn_tready = ($unsigned($random(seed)) % 100) < ready_pct;
        #1;
        up_hold = s_up_tvalid && !s_up_tready;
        dn_hold = s_dn_tvalid && !s_dn_tready;
        if (s_up_tvalid && s_up_tready) up_sent = up_sent + 1;
        if (s_dn_tvalid && s_dn_tready) dn_sent = dn_sent + 1;
        if (m_up_tvalid && m_up_tready) begin
            if (up_got < V) bfs[up_got] = m_up_tdata;
            up_got = up_got + 1;
            up_lasts = up_lasts + m_up_tlast;
        end
        if (m_dn_tvalid && m_dn_tready) begin
            if (dn_got < MAXW) back[dn_got] = m_dn_tdata;
            dn_got = dn_got + 1;
            dn_lasts = dn_lasts + m_dn_tlast;
        end
    end

    task fail(input [8*64-1:0] what);
        begin
            $display("FAIL n=%0d pass=%0d: %0s", n, pass, what);
            errors = errors + 1;
        end
    endtask

    task wait_idle(input integer busy_bit);
        begin
            cyc = 0;
            rd = 32'd1 << busy_bit;
            while (rd[busy_bit] && cyc < 100000) begin
                repeat (4) @(posedge clk);
                cyc = cyc + 4;
                axil_read(8'h04, rd);
            end
            if (cyc >= 100000) fail("timeout");
        end
    endtask

    initial begin
        errors = 0; seed = 7; up_run = 0; dn_run = 0; ready_pct = 100; valid_pct = 100;
        repeat (4) @(posedge clk);
        rst = 1'b0;
        axil_write(8'h10, 32'h3F80);          // scale 1.0
        axil_write(8'h14, 32'h3F800000);      // inverse scale 1.0
        axil_write(8'h18, V);
        for (pass = 0; pass < 2; pass = pass + 1) begin
            ready_pct = pass ? 60 : 100;
            valid_pct = pass ? 70 : 100;
            for (n = 2; n <= 16; n = n + 1) begin
                // pack V exact n-bit values per lane
                nwords = (V * n + 15) / 16;
                for (lane = 0; lane < LANES; lane = lane + 1) begin
                    bits[lane] = 0;
                    for (j = 0; j < V; j = j + 1) begin
                        rnd = $random(seed);
                        v = rnd[15:0] >> (16 - n);
                        if (j == 0) v = 16'd1 << (n - 1);            // -2^(n-1)
                        if (j == 1) v = (16'd1 << (n - 1)) - 16'd1;  // 2^(n-1)-1
                        for (b = 0; b < 16; b = b + 1) if (b >= n) v[b] = v[n - 1];
                        v = exact(v);
                        for (b = 0; b < n; b = b + 1) bits[lane][j * n + b] = v[b];
                    end
                end
                for (j = 0; j < nwords; j = j + 1)
                    for (lane = 0; lane < LANES; lane = lane + 1)
                        words[j][16 * lane +: 16] = bits[lane][16 * j +: 16];
                axil_write(8'h08, n);
                up_sent = 0; up_got = 0; dn_sent = 0; dn_got = 0; up_lasts = 0; dn_lasts = 0;
                up_run = 1;
                axil_write(8'h00, 32'd1);
                repeat (2) @(posedge clk);
                wait_idle(0);
                up_run = 0;
                axil_read(8'h04, rd);
                if (rd[15:8] != 0 || !rd[1]) fail("upstream status");
                if (up_got != V || up_lasts != 1 || up_sent != nwords) fail("upstream beats");
                axil_read(8'h28, rd);
                if (pass == 0 && rd > V + 6) fail("upstream rate below one value per cycle");
                dn_run = 1;
                axil_write(8'h00, 32'd2);
                repeat (2) @(posedge clk);
                wait_idle(2);
                dn_run = 0;
                axil_read(8'h04, rd);
                if (rd[23:16] != 0 || !rd[3]) fail("downstream status");
                if (dn_got != nwords || dn_lasts != 1) fail("downstream beats");
                for (j = 0; j < nwords; j = j + 1)
                    if (back[j] !== words[j]) begin
                        $display("  word %0d: got %h want %h", j, back[j], words[j]);
                        fail("round trip changed a word");
                    end
            end
        end
        if (errors == 0) $display("PASS: 2 x 15 widths x %0d values x %0d lanes round trip", V, LANES);
        else $display("FAIL: %0d errors", errors);
        if (errors != 0) $fatal(1);
        $finish;
    end
endmodule
`default_nettype wire
