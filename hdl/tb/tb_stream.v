// Stream runner for qlib.hdl (the notebook and the benchmark): one upstream and one downstream
// job on nc_top with inputs from hex files, outputs and counters written to a text file.
// Plusargs: +n= +scale= (hex bf16) +inv= (hex f32) +narrow= +count= (values per lane)
//   +up_file= +up_beats= (packed words, one 16*LANES-bit hex beat a line) +dn_file= +dn_beats=
//   (bfloat16 beats) +out= +ready_pct= (0..100, percent of cycles the sinks are ready)
//   +valid_pct= (percent of cycles the sources offer a beat)
//   +seed= +vcd= (optional waveform file) +timeout= (cycles)
`default_nettype none
module tb_stream;
    parameter LANES = 16;
    parameter MAXBEATS = 65536;
    localparam W = 16 * LANES;

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

    reg [W-1:0] up_mem [0:MAXBEATS-1];
    reg [W-1:0] dn_mem [0:MAXBEATS-1];
    reg [1023:0] up_file, dn_file, out_file, vcd_file;
    integer n, narrow, count, up_beats, dn_beats, ready_pct, valid_pct, seed, timeout, fd, i, cyc;
    reg [31:0] scale, inv, rd;
    integer up_sent, dn_sent;
    reg up_run, dn_run;
    integer seed_uv, seed_dv, seed_ur, seed_dr;   // one random sequence per source and sink
    reg up_hold = 1'b0, dn_hold = 1'b0;

    // Sources present beats in order while running; sinks are ready with probability ready_pct.
    // Signals change at the falling edge; the handshakes of the next rising edge are read 1
    // time unit later, when everything has settled.
    always @(negedge clk) begin
        // AXI-Stream: a beat once offered stays offered until taken
        s_up_tvalid = up_run && (up_sent < up_beats) && (up_hold || ($unsigned($random(seed_uv)) % 100 < valid_pct));
        s_up_tdata = (up_sent < up_beats) ? up_mem[up_sent] : {W{1'b0}};
        s_up_tlast = (up_sent == up_beats - 1);
        s_dn_tvalid = dn_run && (dn_sent < dn_beats) && (dn_hold || ($unsigned($random(seed_dv)) % 100 < valid_pct));
        s_dn_tdata = (dn_sent < dn_beats) ? dn_mem[dn_sent] : {W{1'b0}};
        s_dn_tlast = (dn_sent == dn_beats - 1);
        m_up_tready = ($unsigned($random(seed_ur)) % 100) < ready_pct;
        m_dn_tready = ($unsigned($random(seed_dr)) % 100) < ready_pct;
        #1;
        up_hold = s_up_tvalid && !s_up_tready;
        dn_hold = s_dn_tvalid && !s_dn_tready;
        if (s_up_tvalid && s_up_tready) up_sent = up_sent + 1;
        if (s_dn_tvalid && s_dn_tready) dn_sent = dn_sent + 1;
        if (m_up_tvalid && m_up_tready) $fdisplay(fd, "U %h %0d", m_up_tdata, m_up_tlast);
        if (m_dn_tvalid && m_dn_tready) $fdisplay(fd, "D %h %0d", m_dn_tdata, m_dn_tlast);
    end

    task dump_counters(input [7:0] first, input [8*2-1:0] side);
        begin
            axil_read(8'h04, rd); $fdisplay(fd, "S %s %0d", side, rd);
            for (i = 0; i < 4; i = i + 1) begin
                axil_read(first + 4 * i, rd);
                $fdisplay(fd, "C %s %0d %0d", side, i, rd);
            end
        end
    endtask

    task wait_idle(input integer bit_busy);
        begin
            cyc = 0;
            rd = 32'd1 << bit_busy;
            while (rd[bit_busy] && cyc < timeout) begin
                repeat (8) @(posedge clk);
                cyc = cyc + 8;
                axil_read(8'h04, rd);
            end
            if (cyc >= timeout) $fdisplay(fd, "T %0d", bit_busy);
        end
    endtask

    initial begin
        if (!$value$plusargs("n=%d", n)) n = 8;
        if (!$value$plusargs("scale=%h", scale)) scale = 32'h3F80;
        if (!$value$plusargs("inv=%h", inv)) inv = 32'h3F800000;
        if (!$value$plusargs("narrow=%d", narrow)) narrow = 0;
        if (!$value$plusargs("count=%d", count)) count = 0;
        if (!$value$plusargs("up_beats=%d", up_beats)) up_beats = 0;
        if (!$value$plusargs("dn_beats=%d", dn_beats)) dn_beats = 0;
        if (!$value$plusargs("ready_pct=%d", ready_pct)) ready_pct = 100;
        if (!$value$plusargs("valid_pct=%d", valid_pct)) valid_pct = 100;
        if (!$value$plusargs("seed=%d", seed)) seed = 1;
        seed_uv = seed * 4 + 1; seed_dv = seed * 4 + 2; seed_ur = seed * 4 + 3; seed_dr = seed * 4 + 4;
        if (!$value$plusargs("timeout=%d", timeout)) timeout = 10000000;
        if (!$value$plusargs("out=%s", out_file)) out_file = "tb_stream.out";
        if ($value$plusargs("vcd=%s", vcd_file)) begin
            $dumpfile(vcd_file);
            $dumpvars(0, tb_stream);
        end
        if (up_beats > 0 && $value$plusargs("up_file=%s", up_file)) $readmemh(up_file, up_mem, 0, up_beats - 1);
        if (dn_beats > 0 && $value$plusargs("dn_file=%s", dn_file)) $readmemh(dn_file, dn_mem, 0, dn_beats - 1);
        fd = $fopen(out_file, "w");
        up_sent = 0; dn_sent = 0; up_run = 0; dn_run = 0;
        repeat (4) @(posedge clk);
        rst = 1'b0;
        axil_read(8'h1C, rd); $fdisplay(fd, "L %0d", rd);
        axil_write(8'h08, n);
        axil_write(8'h0C, narrow);
        axil_write(8'h10, scale);
        axil_write(8'h14, inv);
        axil_write(8'h18, count);
        up_run = 1;
        axil_write(8'h00, 32'd1);
        repeat (2) @(posedge clk);
        wait_idle(0);
        up_run = 0;
        dump_counters(8'h20, "UP");
        if (dn_beats > 0) begin
            dn_run = 1;
            axil_write(8'h00, 32'd2);
            repeat (2) @(posedge clk);
            wait_idle(2);
            dn_run = 0;
            dump_counters(8'h30, "DN");
        end
        $fdisplay(fd, "E");
        $fclose(fd);
        $finish;
    end
endmodule
`default_nettype wire
