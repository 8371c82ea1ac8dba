// Number converter top level: LANES lanes side by side on 16*LANES-bit AXI-Stream buses and an
// AXI-Lite register file (map in qlib/hdl/model.py, REGISTERS and STATUS_BITS).
//
// Lane i owns bits 16i+15..16i of every beat. The lanes run in lock step (their control depends
// only on n, the counts and tlast, never on data), so a beat moves on all lanes at once.
// Streams: s_up (packed words in), m_up (bfloat16 out), s_dn (bfloat16 in), m_dn (packed out).
`default_nettype none
module nc_top #(
    parameter LANES = 16
) (
    input  wire                  clk,
    input  wire                  rst,          // synchronous, active high
    // AXI-Lite slave (32-bit registers)
    input  wire [7:0]            s_axil_awaddr,
    input  wire                  s_axil_awvalid,
    output wire                  s_axil_awready,
    input  wire [31:0]           s_axil_wdata,
    input  wire [3:0]            s_axil_wstrb,
    input  wire                  s_axil_wvalid,
    output wire                  s_axil_wready,
    output wire [1:0]            s_axil_bresp,
    output reg                   s_axil_bvalid,
    input  wire                  s_axil_bready,
    input  wire [7:0]            s_axil_araddr,
    input  wire                  s_axil_arvalid,
    output wire                  s_axil_arready,
    output reg  [31:0]           s_axil_rdata,
    output wire [1:0]            s_axil_rresp,
    output reg                   s_axil_rvalid,
    input  wire                  s_axil_rready,
    // upstream: packed words in, bfloat16 out
    input  wire [16*LANES-1:0]   s_up_axis_tdata,
    input  wire                  s_up_axis_tvalid,
    input  wire                  s_up_axis_tlast,
    output wire                  s_up_axis_tready,
    output wire [16*LANES-1:0]   m_up_axis_tdata,
    output wire                  m_up_axis_tvalid,
    output wire                  m_up_axis_tlast,
    input  wire                  m_up_axis_tready,
    // downstream: bfloat16 in, packed words out
    input  wire [16*LANES-1:0]   s_dn_axis_tdata,
    input  wire                  s_dn_axis_tvalid,
    input  wire                  s_dn_axis_tlast,
    output wire                  s_dn_axis_tready,
    output wire [16*LANES-1:0]   m_dn_axis_tdata,
    output wire                  m_dn_axis_tvalid,
    output wire                  m_dn_axis_tlast,
    input  wire                  m_dn_axis_tready
);
    // ------------------------------------------------------------------ registers
    reg [31:0] r_bits, r_narrow, r_scale, r_inv, r_count;
    reg [31:0] c_up_words, c_up_values, c_up_cycles, c_up_stalls;
    reg [31:0] c_dn_values, c_dn_words, c_dn_cycles, c_dn_stalls;
    reg        up_done, dn_done;
    reg        up_err_width, up_err_scale, up_err_short, up_err_long;
    reg        dn_err_width, dn_err_scale, dn_err_nan, dn_err_inf, dn_sat;
    reg        up_go, dn_go;            // start requests, acted on the cycle after the write
    // job configuration: latched at each start (so register writes during a job change
    // nothing) and shared by all lanes; masks and bounds computed here once
    reg [4:0]  up_n, dn_n;
    reg [15:0] up_mask, dn_mask, up_scale;
    reg [16:0] dn_hi, dn_lomag;
    reg [31:0] dn_inv;
    wire [4:0]  n_w = r_bits[4:0];
    wire [15:0] mask_w = (n_w >= 5'd16) ? 16'hFFFF : ((16'd1 << n_w) - 16'd1);

    wire wr = s_axil_awvalid && s_axil_wvalid && !s_axil_bvalid;
    assign s_axil_awready = wr;
    assign s_axil_wready = wr;
    assign s_axil_bresp = 2'b00;
    assign s_axil_rresp = 2'b00;
    assign s_axil_arready = !s_axil_rvalid;
    wire [3:0] widx = s_axil_awaddr[5:2];
    wire [3:0] ridx = s_axil_araddr[5:2];

    function [31:0] strobe(input [31:0] old, input [31:0] data, input [3:0] strb);
        integer b;
        begin
            for (b = 0; b < 4; b = b + 1)
                strobe[8*b +: 8] = strb[b] ? data[8*b +: 8] : old[8*b +: 8];
        end
    endfunction

    // ------------------------------------------------------------------ lanes
    wire [LANES-1:0] up_s_ready, up_m_valid, up_m_last, dn_s_ready, dn_m_valid, dn_m_last;
    wire [LANES-1:0] up_act, dn_act;
    wire [5*LANES-1:0] ev;
    wire up_active = |up_act;
    wire dn_active = |dn_act;
    // BUSY reads high until DONE is set (one cycle after the last lane goes idle), so a poll
    // never sees neither
    reg  up_active_q, dn_active_q;
    wire bits_ok = (r_bits >= 32'd2) && (r_bits <= 32'd16);
    wire up_start = up_go && !up_active && bits_ok;
    wire dn_start = dn_go && !dn_active && bits_ok;

    assign s_up_axis_tready = &up_s_ready;
    assign m_up_axis_tvalid = &up_m_valid;
    assign m_up_axis_tlast = up_m_last[0];
    assign s_dn_axis_tready = &dn_s_ready;
    assign m_dn_axis_tvalid = &dn_m_valid;
    assign m_dn_axis_tlast = dn_m_last[0];
    wire up_in = s_up_axis_tvalid && s_up_axis_tready;
    wire up_out = m_up_axis_tvalid && m_up_axis_tready;
    wire dn_in = s_dn_axis_tvalid && s_dn_axis_tready;
    wire dn_out = m_dn_axis_tvalid && m_dn_axis_tready;

    genvar i;
    generate
        for (i = 0; i < LANES; i = i + 1) begin : lane
            nc_lane u_lane (
                .clk(clk), .rst(rst), .up_start(up_start), .dn_start(dn_start),
                .up_n(up_n), .up_mask(up_mask), .scale(up_scale), .count_cfg(r_count),
                .dn_n(dn_n), .dn_mask(dn_mask), .dn_hi(dn_hi), .dn_lomag(dn_lomag), .inv(dn_inv),
                .up_s_valid(up_in), .up_s_data(s_up_axis_tdata[16*i +: 16]),
                .up_s_last(s_up_axis_tlast), .up_s_ready(up_s_ready[i]),
                .up_m_valid(up_m_valid[i]), .up_m_data(m_up_axis_tdata[16*i +: 16]),
                .up_m_last(up_m_last[i]), .up_m_ready(up_out),
                .dn_s_valid(dn_in), .dn_s_data(s_dn_axis_tdata[16*i +: 16]),
                .dn_s_last(s_dn_axis_tlast), .dn_s_ready(dn_s_ready[i]),
                .dn_m_valid(dn_m_valid[i]), .dn_m_data(m_dn_axis_tdata[16*i +: 16]),
                .dn_m_last(dn_m_last[i]), .dn_m_ready(dn_out),
                .up_active(up_act[i]), .dn_active(dn_act[i]), .events(ev[5*i +: 5]));
        end
    endgenerate

    reg [4:0] ev_any;
    integer k;
    always @(*) begin
        ev_any = 5'd0;
        for (k = 0; k < LANES; k = k + 1) ev_any = ev_any | ev[5*k +: 5];
    end

    wire [31:0] status = {11'd0, dn_sat, dn_err_inf, dn_err_nan, dn_err_scale, dn_err_width,
                          4'd0, up_err_long, up_err_short, up_err_scale, up_err_width,
                          4'd0, dn_done, dn_active | dn_active_q, up_done, up_active | up_active_q};

    always @(posedge clk) begin
        if (rst) begin
            s_axil_bvalid <= 1'b0; s_axil_rvalid <= 1'b0; s_axil_rdata <= 32'd0;
            r_bits <= 32'd8; r_narrow <= 32'd0; r_scale <= 32'h3F80; r_inv <= 32'h3F800000;
            r_count <= 32'd0; up_go <= 1'b0; dn_go <= 1'b0;
            up_n <= 5'd16; up_mask <= 16'hFFFF; up_scale <= 16'd0; dn_n <= 5'd16;
            dn_mask <= 16'hFFFF; dn_hi <= 17'd0; dn_lomag <= 17'd0; dn_inv <= 32'd0;
            up_done <= 1'b0; dn_done <= 1'b0; up_active_q <= 1'b0; dn_active_q <= 1'b0;
            {up_err_width, up_err_scale, up_err_short, up_err_long} <= 4'd0;
            {dn_err_width, dn_err_scale, dn_err_nan, dn_err_inf, dn_sat} <= 5'd0;
            {c_up_words, c_up_values, c_up_cycles, c_up_stalls} <= 128'd0;
            {c_dn_values, c_dn_words, c_dn_cycles, c_dn_stalls} <= 128'd0;
        end else begin
            // AXI-Lite write
            up_go <= 1'b0; dn_go <= 1'b0;
            if (wr) begin
                case (widx)
                    4'd0: begin up_go <= s_axil_wstrb[0] & s_axil_wdata[0];
                                dn_go <= s_axil_wstrb[0] & s_axil_wdata[1]; end
                    4'd2: r_bits <= strobe(r_bits, s_axil_wdata, s_axil_wstrb);
                    4'd3: r_narrow <= strobe(r_narrow, s_axil_wdata, s_axil_wstrb);
                    4'd4: r_scale <= strobe(r_scale, s_axil_wdata, s_axil_wstrb);
                    4'd5: r_inv <= strobe(r_inv, s_axil_wdata, s_axil_wstrb);
                    4'd6: r_count <= strobe(r_count, s_axil_wdata, s_axil_wstrb);
                    default: ;
                endcase
            end
            if (wr) s_axil_bvalid <= 1'b1;
            else if (s_axil_bready) s_axil_bvalid <= 1'b0;
            // AXI-Lite read
            if (s_axil_arvalid && s_axil_arready) begin
                s_axil_rvalid <= 1'b1;
                case (ridx)
                    4'd1: s_axil_rdata <= status;
                    4'd2: s_axil_rdata <= r_bits;
                    4'd3: s_axil_rdata <= r_narrow;
                    4'd4: s_axil_rdata <= r_scale;
                    4'd5: s_axil_rdata <= r_inv;
                    4'd6: s_axil_rdata <= r_count;
                    4'd7: s_axil_rdata <= LANES;
                    4'd8: s_axil_rdata <= c_up_words;
                    4'd9: s_axil_rdata <= c_up_values;
                    4'd10: s_axil_rdata <= c_up_cycles;
                    4'd11: s_axil_rdata <= c_up_stalls;
                    4'd12: s_axil_rdata <= c_dn_values;
                    4'd13: s_axil_rdata <= c_dn_words;
                    4'd14: s_axil_rdata <= c_dn_cycles;
                    4'd15: s_axil_rdata <= c_dn_stalls;
                    default: s_axil_rdata <= 32'd0;
                endcase
            end else if (s_axil_rready) s_axil_rvalid <= 1'b0;

            // job configuration
            if (up_start) begin
                up_n <= n_w; up_mask <= mask_w; up_scale <= r_scale[15:0];
            end
            if (dn_start) begin
                dn_n <= n_w; dn_mask <= mask_w; dn_inv <= r_inv;
                dn_hi <= (17'd1 << (n_w - 5'd1)) - 17'd1;
                dn_lomag <= (17'd1 << (n_w - 5'd1)) - {16'd0, r_narrow[0]};
            end
            // upstream job control, flags and counters
            up_active_q <= up_active;
            if (up_go && !up_active) begin   // a start while a job runs is ignored
                {up_err_width, up_err_scale, up_err_short, up_err_long} <= 4'd0;
                {c_up_words, c_up_values, c_up_cycles, c_up_stalls} <= 128'd0;
                up_done <= !bits_ok;
                up_err_width <= !bits_ok;
                up_err_scale <= bits_ok && (r_scale[14:7] == 8'd0 || r_scale[14:7] == 8'hFF);
            end else begin
                if (up_active_q && !up_active) up_done <= 1'b1;
                if (ev_any[0]) up_err_short <= 1'b1;
                if (ev_any[1]) up_err_long <= 1'b1;
                if (up_active) c_up_cycles <= c_up_cycles + 32'd1;
                if (up_in) c_up_words <= c_up_words + 32'd1;
                if (up_out) c_up_values <= c_up_values + 32'd1;
                if (m_up_axis_tvalid && !m_up_axis_tready) c_up_stalls <= c_up_stalls + 32'd1;
            end
            // downstream job control, flags and counters
            dn_active_q <= dn_active;
            if (dn_go && !dn_active) begin
                {dn_err_width, dn_err_scale, dn_err_nan, dn_err_inf, dn_sat} <= 5'd0;
                {c_dn_values, c_dn_words, c_dn_cycles, c_dn_stalls} <= 128'd0;
                dn_done <= !bits_ok;
                dn_err_width <= !bits_ok;
                dn_err_scale <= bits_ok && (r_inv[30:23] == 8'd0 || r_inv[30:23] == 8'hFF);
            end else begin
                if (dn_active_q && !dn_active) dn_done <= 1'b1;
                if (ev_any[2]) dn_err_nan <= 1'b1;
                if (ev_any[3]) dn_err_inf <= 1'b1;
                if (ev_any[4]) dn_sat <= 1'b1;
                if (dn_active) c_dn_cycles <= c_dn_cycles + 32'd1;
                if (dn_in) c_dn_values <= c_dn_values + 32'd1;
                if (dn_out) c_dn_words <= c_dn_words + 32'd1;
                if (m_dn_axis_tvalid && !m_dn_axis_tready) c_dn_stalls <= c_dn_stalls + 32'd1;
            end
        end
    end
endmodule
`default_nettype wire
